"""`kuas samplers`: the sampler names (with their aliases and default schedule) and the schedule types."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("samplers", help="list sampler names, their aliases and the schedule types")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=run)


def describe() -> dict:
    """Samplers and schedules as plain data (what `kuas samplers --json` prints)."""
    from kuas.sampling.registry import SAMPLERS, SCHEDULES

    return {
        "samplers": [
            {
                "name": spec.name,
                "aliases": list(spec.aliases),
                "default_schedule": SCHEDULES[spec.default_schedule].label,
                "second_order": spec.second_order,
                "stochastic": spec.stochastic,
            }
            for spec in SAMPLERS.values()
        ],
        "schedules": [
            {"label": spec.label, "key": spec.key, "aliases": list(spec.aliases)}
            for spec in SCHEDULES.values()
        ],
    }


def format_description(desc: dict) -> str:
    lines = ["Samplers (name: aliases; schedule used for 'Automatic'):"]
    width = max(len(s["name"]) for s in desc["samplers"])
    for s in desc["samplers"]:
        lines.append(f"  {s['name']:<{width}}  {', '.join(s['aliases'])}; {s['default_schedule']}")
    lines.append("")
    lines.append("Schedule types (label: key, aliases):")
    width = max(len(s["label"]) for s in desc["schedules"])
    for s in desc["schedules"]:
        names = ", ".join([s["key"], *s["aliases"]])
        lines.append(f"  {s['label']:<{width}}  {names}")
    lines.append("")
    lines.append("A schedule label may follow a sampler name, as in A1111: 'DPM++ 2M Karras'.")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    desc = describe()
    if args.json:
        import json

        print(json.dumps(desc, indent=2))
    else:
        print(format_description(desc))
    return 0
