"""AUTOMATIC1111's "infotext": the generation parameters stored with every image.

Layout (what A1111 writes in the PNG ``parameters`` chunk and what Civitai, Fooocus and sd.cpp read):

    a prompt, possibly
    on several lines
    Negative prompt: what to avoid
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x512, Model hash: 6ce0161689

* the ``Negative prompt:`` line appears only when the negative prompt is not empty;
* the last line is ``Key: value`` pairs joined by ``", "``; fields whose value is None are left out;
* a value containing ``,``, ``:`` or a newline is written as a JSON string (``"a, b"``). kuas also quotes a
  value that starts with ``"`` (A1111 writes it raw and then misreads it as JSON on the way back);
* a field whose value equals its own key is written as the bare key (A1111 does the same);
* the whole text is stripped of surrounding whitespace.

Reading follows A1111's ``parse_generation_parameters``: the last line holds the parameters only when at
least three ``Key: value`` pairs are found on it (otherwise it belongs to the prompt), ``WxH`` values also
give ``Key-1`` / ``Key-2`` entries. Unlike A1111, kuas does not add the web UI's defaults for missing
fields (``Clip skip: 1``, ``RNG: GPU``...): `infotext_to_request` applies kuas' own defaults instead.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from kuas.errors import InvalidInputError

log = logging.getLogger(__name__)

__all__ = [
    "FIELD_ORDER",
    "ParsedInfotext",
    "format_infotext",
    "format_value",
    "infotext_to_request",
    "parse_infotext",
]

# A1111's order of the built-in fields (processing.create_infotext). Fields not listed here ("Mask blur",
# "Hires upscale", "Lora hashes"...) are A1111's extra_generation_params: they go after "Tiling" in the
# order the caller gave them, and "Version" / "User" always close the line.
FIELD_ORDER: tuple[str, ...] = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Image CFG scale",
    "Seed",
    "Face restoration",
    "Size",
    "Model hash",
    "Model",
    "FP8 weight",
    "Cache FP16 weight for LoRA",
    "VAE hash",
    "VAE",
    "Variation seed",
    "Variation seed strength",
    "Seed resize from",
    "Denoising strength",
    "Conditional mask weight",
    "Clip skip",
    "ENSD",
    "Token merging ratio",
    "Token merging ratio hr",
    "Init image hash",
    "RNG",
    "NGMS",
    "Tiling",
)
_CLOSING_FIELDS: tuple[str, ...] = ("Version", "User")

NEGATIVE_PREFIX = "Negative prompt:"

# A key is a word character followed by word characters, spaces, '-' or '/' (at least two characters).
_KEY = r"\w[\w \-/]+"
# One "Key: value" pair of the parameters line: a value is either a JSON-style quoted string (backslash
# escapes allowed) or everything up to the next comma.
_PAIR = re.compile(rf"""\s*(?P<key>{_KEY}):\s*(?P<value>"(?:\\.|[^\\"])+"|[^,]*)(?:,|$)""")
_KEY_ONLY = re.compile(_KEY)
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_MIN_PAIRS_ON_PARAMS_LINE = 3


class ParsedInfotext(NamedTuple):
    """What `parse_infotext` returns; unpacks as ``prompt, negative_prompt, fields``."""

    prompt: str
    negative_prompt: str
    fields: dict[str, str]


# -- writing --------------------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    """A field value as A1111 prints it: whole floats without ``.0`` (``CFG scale: 7``), ``True``/``False``
    for booleans, ``(w, h)`` pairs as ``WxH``; anything else through ``str``."""
    if isinstance(value, bool):
        return "True" if value else "False"
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InvalidInputError(f"infotext values must be finite numbers, got {value!r}")
        return str(int(value)) if value.is_integer() else repr(value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    return str(value)


def _quote(text: str) -> str:
    if any(c in text for c in ",:\n") or text.startswith('"'):
        return json.dumps(text, ensure_ascii=False)
    return text


def _ordered_fields(fields: Mapping[str, Any]) -> list[tuple[str, Any]]:
    known = [(k, fields[k]) for k in FIELD_ORDER if k in fields]
    extra = [(k, v) for k, v in fields.items() if k not in FIELD_ORDER and k not in _CLOSING_FIELDS]
    closing = [(k, fields[k]) for k in _CLOSING_FIELDS if k in fields]
    return known + extra + closing


def format_infotext(prompt: str, negative_prompt: str, fields: Mapping[str, Any]) -> str:
    """The A1111 infotext for one image.

    `fields` maps A1111 field names ("Steps", "Sampler", "CFG scale", "Seed", "Size", ...) to values;
    None values are omitted, the built-in fields are put in A1111's order whatever the mapping's order, and
    other fields follow in the given order before "Version" and "User".
    """
    parts = []
    for key, value in _ordered_fields(fields):
        if value is None:
            continue
        if not isinstance(key, str) or _KEY_ONLY.fullmatch(key) is None:
            raise InvalidInputError(
                f"infotext field name {key!r} cannot be written: names are a letter, digit or '_' followed by "
                f"letters, digits, '_', spaces, '-' or '/' (no ':' or ',')"
            )
        text = format_value(value)
        parts.append(key if text == key else f"{key}: {_quote(text)}")
    negative = f"\n{NEGATIVE_PREFIX} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{', '.join(parts)}".strip()


# -- reading --------------------------------------------------------------------------------------------
def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        try:
            decoded = json.loads(value)
        except ValueError:
            return value
        return decoded if isinstance(decoded, str) else value
    return value


def parse_infotext(text: str) -> ParsedInfotext:
    """Split an A1111 infotext into prompt, negative prompt and the parameters (all values strings).

    Multi-line prompts and negative prompts keep their line breaks (each line stripped, as A1111 does).
    A ``WxH`` value also yields ``<Key>-1`` = W and ``<Key>-2`` = H (``Size-1``, ``Size-2``, ``Hires
    resize-1``...). Text without a parameters line is all prompt.
    """
    if not isinstance(text, str):
        raise InvalidInputError(f"infotext must be a string, got {type(text).__name__}")
    *lines, last = text.replace("\r\n", "\n").replace("\r", "\n").strip().split("\n")
    if len(_PAIR.findall(last)) < _MIN_PAIRS_ON_PARAMS_LINE:
        lines.append(last)
        last = ""

    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE_PREFIX):
            in_negative = True
            line = line[len(NEGATIVE_PREFIX) :].strip()
        (negative_lines if in_negative else prompt_lines).append(line)

    fields: dict[str, str] = {}
    for m in _PAIR.finditer(last):
        key, value = m.group("key"), _unquote(m.group("value"))
        fields[key] = value
        size = _SIZE.match(value)
        if size:
            fields[f"{key}-1"], fields[f"{key}-2"] = size.group(1), size.group(2)
    return ParsedInfotext("\n".join(prompt_lines), "\n".join(negative_lines), fields)


# -- to a kuas request ----------------------------------------------------------------------------------
def _as_int(fields: Mapping[str, str], key: str) -> int:
    raw = fields[key].strip()
    try:
        return int(raw)
    except ValueError:
        try:
            number = float(raw)
        except ValueError:
            number = math.nan
        if number.is_integer():
            return int(number)
        raise InvalidInputError(f"infotext field {key!r} should be a whole number, got {raw!r}") from None


def _as_float(fields: Mapping[str, str], key: str) -> float:
    raw = fields[key].strip()
    try:
        number = float(raw)
    except ValueError:
        number = math.nan
    if not math.isfinite(number):
        raise InvalidInputError(f"infotext field {key!r} should be a finite number, got {raw!r}")
    return number


def _as_bool(fields: Mapping[str, str], key: str) -> bool:
    raw = fields[key].strip().lower()
    if raw in ("true", "1", "yes"):
        return True
    if raw in ("false", "0", "no"):
        return False
    raise InvalidInputError(f"infotext field {key!r} should be True or False, got {fields[key]!r}")


# infotext field -> (kuas keyword, converter); "Denoising strength" and "Size" are handled apart.
_SIMPLE_FIELDS: dict[str, tuple[str, Any]] = {
    "Steps": ("steps", _as_int),
    "Sampler": ("sampler", lambda f, k: f[k].strip()),
    "Schedule type": ("scheduler", lambda f, k: f[k].strip()),
    "CFG scale": ("cfg_scale", _as_float),
    "Seed": ("seed", _as_int),
    "Clip skip": ("clip_skip", _as_int),
    "Emphasis": ("emphasis", lambda f, k: f[k].strip()),
    "Noise Schedule": ("noise_schedule", lambda f, k: f[k].strip()),
    "Variation seed": ("subseed", _as_int),
    "Variation seed strength": ("subseed_strength", _as_float),
    "Tiling": ("tiling", _as_bool),
    "Eta": ("eta", _as_float),
    "Guidance rescale": ("guidance_rescale", _as_float),
    "Skip Early CFG": ("skip_early_cfg", _as_float),
    "Mask blur": ("mask_blur", _as_int),
    "Masked area padding": ("inpaint_full_res_padding", _as_int),
    "Hires upscale": ("hr_scale", _as_float),
    "Hires steps": ("hr_second_pass_steps", _as_int),
    "Hires upscaler": ("hr_upscaler", lambda f, k: f[k].strip()),
    "Token merging ratio": ("tome_ratio", _as_float),
    "DeepCache interval": ("deepcache_interval", _as_int),
}
# A1111's img2img fields with named values: field -> (kuas keyword, {value: setting}).
_NAMED_FIELDS: dict[str, tuple[str, dict[str, Any]]] = {
    "Masked content": (
        "inpainting_fill",
        {
            "fill": "fill",
            "original": "original",
            "latent noise": "latent noise",
            "latent nothing": "latent nothing",
        },
    ),
    "Inpaint area": ("inpaint_full_res", {"only masked": True, "whole picture": False}),
    "Mask mode": ("invert_mask", {"inpaint not masked": True, "inpaint masked": False}),
}
_HIRES_FIELDS = ("Hires upscale", "Hires steps", "Hires upscaler")
# Fields that describe the image or the software, not a generation setting: skipped without a note.
_DESCRIPTIVE_FIELDS = frozenset(
    {
        "Model hash",
        "Model",
        "VAE hash",
        "VAE",
        "Version",
        "User",
        "Size-1",
        "Size-2",
        "Init image hash",
        "Lora hashes",
        "TI hashes",
    }
)


def infotext_to_request(parsed: ParsedInfotext | tuple[str, str, Mapping[str, str]] | str) -> dict[str, Any]:
    """Keyword arguments for kuas' pipelines (``txt2img(sd, **request)``) from a parsed infotext.

    Steps -> steps, Sampler -> sampler, Schedule type -> scheduler, CFG scale -> cfg_scale, Seed -> seed,
    Size -> width/height, Clip skip -> clip_skip, Variation seed / strength -> subseed / subseed_strength,
    Tiling, Eta, Mask blur, Masked area padding -> inpaint_full_res_padding, Masked content ->
    inpainting_fill, Inpaint area ("Only masked") -> inpaint_full_res, Mask mode ("Inpaint not masked") ->
    invert_mask, Guidance rescale, kuas' Outpaint ("left N right N top N bottom N"); "Hires upscale / steps /
    upscaler" turn on the hires fix (enable_hr, hr_scale, hr_second_pass_steps, hr_upscaler), and then
    "Denoising strength" is the second pass's (hr_denoising_strength), as in A1111's txt2img; otherwise it
    is img2img's strength. Fields kuas has no setting for are logged and skipped; a malformed number raises
    InvalidInputError naming the field.
    """
    if isinstance(parsed, str):
        parsed = parse_infotext(parsed)
    prompt, negative, fields = parsed
    request: dict[str, Any] = {"prompt": prompt, "negative_prompt": negative}
    for key, (name, convert) in _SIMPLE_FIELDS.items():
        if key in fields:
            request[name] = convert(fields, key)
    unknown_values = []
    if "Outpaint" in fields:  # kuas' outpaint: "left 64 right 0 top 0 bottom 8"
        words = fields["Outpaint"].split()
        sides = dict(zip(words[0::2], words[1::2]))
        if len(words) % 2 or not sides or not set(sides) <= {"left", "right", "top", "bottom"}:
            raise InvalidInputError(
                f"infotext field 'Outpaint' should read 'left N right N top N bottom N', got "
                f"{fields['Outpaint']!r}"
            )
        for side, value in sides.items():
            request[side] = _as_int({side: value}, side)
    for key, (name, values) in _NAMED_FIELDS.items():
        if key in fields:
            value = fields[key].strip().lower()
            if value in values:
                request[name] = values[value]
            else:
                unknown_values.append(f"{key}: {fields[key]}")
    if "Size-1" in fields and "Size-2" in fields:
        request["width"], request["height"] = _as_int(fields, "Size-1"), _as_int(fields, "Size-2")
    hires = any(k in fields for k in _HIRES_FIELDS)
    if hires:
        request["enable_hr"] = True
    if "Denoising strength" in fields:
        request["hr_denoising_strength" if hires else "strength"] = _as_float(fields, "Denoising strength")
    skipped = [
        k
        for k in fields
        if k not in _SIMPLE_FIELDS
        and k not in _NAMED_FIELDS
        and k not in _DESCRIPTIVE_FIELDS
        and k not in ("Size", "Denoising strength", "Outpaint")
        and not k.endswith(("-1", "-2"))
    ]
    if skipped or unknown_values:
        log.info("infotext fields kuas has no setting for, ignored: %s", ", ".join(skipped + unknown_values))
    return request
