"""Images in and out: robust loading, PNG saving with A1111 infotext, the invisible watermark.

    from kuas.images import load_image, save_png, format_infotext, apply_watermark, detect_watermark
    image = load_image("photo.jpg", what="init image")     # RGB, upright, safe against bad files
    save_png(image, "out.png", parameters=format_infotext("a cat", "", {"Steps": 20, "Seed": 1}))

Modules: `io` (reading and writing files), `infotext` (A1111's parameters text), `watermark` (the
reference scripts' dwtDct mark, in numpy).
"""

from __future__ import annotations

from kuas.images.infotext import (
    FIELD_ORDER,
    ParsedInfotext,
    format_infotext,
    infotext_to_request,
    parse_infotext,
)
from kuas.images.io import (
    ALPHA_BACKGROUND,
    DEFAULT_MAX_PIXELS,
    check_writable_dir,
    load_image,
    load_mask,
    next_output_path,
    read_infotext,
    save_numbered_png,
    save_png,
)
from kuas.images.watermark import (
    WATERMARK_MESSAGE,
    WatermarkResult,
    apply_watermark,
    detect_watermark,
)

__all__ = [
    "ALPHA_BACKGROUND",
    "DEFAULT_MAX_PIXELS",
    "FIELD_ORDER",
    "WATERMARK_MESSAGE",
    "ParsedInfotext",
    "WatermarkResult",
    "apply_watermark",
    "check_writable_dir",
    "detect_watermark",
    "format_infotext",
    "infotext_to_request",
    "load_image",
    "load_mask",
    "next_output_path",
    "parse_infotext",
    "read_infotext",
    "save_numbered_png",
    "save_png",
]
