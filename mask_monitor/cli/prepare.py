"""``mask-monitor prepare``: write a conversational dataset as SFTTrainer trains on it, answers only.

The offline form of :func:`mask_monitor.assistant_only`: the conversations are tokenized as TRL tokenizes
them and written with ``input_ids`` and ``assistant_masks`` (1 on each assistant answer and its end of
turn), which ``SFTTrainer`` honours with its defaults, packing, padding-free and ``max_length``. The data is
audited before and after with TRL's own preparation for the given settings (the ``mask-monitor audit``
pipeline), and the numbers are reported side by side. Exit codes: 0 written and healthy after, 1 the
prepared data still has a finding whose action is ``abort``, 2 a usage or input error (one line).

Example::

    mask-monitor prepare --tokenizer Qwen/Qwen2.5-0.5B-Instruct --data train.jsonl --out train_answers
    # then: SFTTrainer(..., train_dataset=datasets.load_from_disk("train_answers"), processing_class=tokenizer)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Any

from ._errors import EXIT_FINDING, EXIT_OK, UsageError

__all__ = ["register", "run", "COMPARED"]

#: (label, Totals attribute) of the before/after table.
COMPARED: tuple[tuple[str, str], ...] = (
    ("supervised tokens", "supervised_tokens"),
    ("prompt leakage", "prompt_leakage_ratio"),
    ("response coverage", "response_coverage_ratio"),
    ("end of turn supervised", "eot_supervised_ratio"),
    ("assistant responses", "assistant_responses"),
    ("unterminated responses", "unterminated_responses"),
    ("fully masked sequences", "fully_masked_sequences"),
)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "prepare",
        help="write a conversational dataset tokenized with exact assistant-only masks (the cure), before/after",
        description=(
            "Tokenize conversations as SFTTrainer does and write input_ids + assistant_masks (1 = an assistant "
            "answer or its end of turn), for any chat template mask-monitor can read. Audits the data before "
            "and after with TRL's own preparation. Exit 0 written, 1 the result still has a blocking finding, "
            "2 usage or input error."
        ),
    )
    src = p.add_argument_group("inputs")
    src.add_argument("--tokenizer", required=True, help="tokenizer folder or hub name")
    src.add_argument("--data", required=True, help="JSONL/JSON/Parquet/CSV file, a save_to_disk folder or a hub name")
    src.add_argument("--split", default="train", help="split of a folder / hub dataset (default: train)")
    src.add_argument("--out", required=True, metavar="PATH",
                     help="where to write: a folder (datasets.save_to_disk), or a .jsonl / .parquet file")
    src.add_argument("--template", default="auto",
                     help="auto (detect), a registered family name, or a JSON/YAML file of ChatTemplate fields")
    src.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                     help='template variables for every example, e.g. \'{"enable_thinking": false}\'')
    src.add_argument("--num-proc", type=int, help="processes for tokenization")
    trl = p.add_argument_group("trainer settings for the before/after audit (SFTConfig fields)")
    trl.add_argument("--config", help="SFTConfig file (YAML or JSON)")
    trl.add_argument("--max-length", default=None, metavar="N|none", help="max_length of the audit (default: config)")
    trl.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None)
    trl.add_argument("--padding-free", action=argparse.BooleanOptionalAction, default=None)
    trl.add_argument("--no-audit", action="store_true", help="write only; skip the before/after audit")
    out = p.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print the before/after numbers as JSON on stdout")
    out.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.set_defaults(func=run)


def _sft(args: argparse.Namespace) -> dict[str, Any]:
    from ..audit.prepare import read_config_file
    from .audit import _max_length

    sft: dict[str, Any] = read_config_file(args.config) if args.config else {}
    if args.max_length is not None:
        try:
            sft["max_length"] = _max_length(str(args.max_length))
        except argparse.ArgumentTypeError as exc:
            raise UsageError(f"--max-length: {exc}") from None
    for name in ("packing", "padding_free"):
        if getattr(args, name) is not None:
            sft[name] = getattr(args, name)
    # the cured data is trained on as is: TRL's own assistant-only template swap is not wanted
    sft.pop("assistant_only_loss", None)
    return sft


def _write(dataset: Any, out: Path, force: bool) -> str:
    if out.exists() and not force:
        raise UsageError(f"{out} exists (use --force to overwrite)")
    suffix = out.suffix.lower()
    if suffix in (".jsonl", ".json"):
        dataset.to_json(str(out), lines=True)
        return "jsonl file"
    if suffix == ".parquet":
        dataset.to_parquet(str(out))
        return "parquet file"
    if out.exists():
        import shutil

        shutil.rmtree(out) if out.is_dir() else out.unlink()
    dataset.save_to_disk(str(out))
    return "save_to_disk folder"


def _audit(tokenizer: Any, data: str, split: str, sft: dict[str, Any], template: str) -> Any:
    from ..audit.pipeline import AuditOptions, run_audit

    return run_audit(AuditOptions(tokenizer="(loaded)", data=data, split=split, sft=dict(sft), template=template),
                     tokenizer=tokenizer)


def _numbers(result: Any) -> dict[str, Any]:
    t = result.totals
    out = {}
    for _, attr in COMPARED:
        value = getattr(t, attr)
        out[attr] = None if value is None else (round(value, 6) if isinstance(value, float) else value)
    out["findings"] = sorted({f.check for f in result.findings})
    return out


def _fmt(attr: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if attr.endswith("_ratio"):
        return f"{100 * value:.1f}%"
    return f"{int(value):,}"


def run(args: argparse.Namespace) -> int:
    import datasets

    from ..audit.data import load_data
    from ..audit.pipeline import load_tokenizer
    from ..cure import AssistantOnly, CureError
    from ..templates import TemplateSpecError, TemplateUnreadable, resolve_template

    kwargs = None
    if args.chat_template_kwargs:
        try:
            kwargs = json.loads(args.chat_template_kwargs)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--chat-template-kwargs: not JSON ({exc.msg})") from None
        if not isinstance(kwargs, dict):
            raise UsageError("--chat-template-kwargs: expected a JSON object")
    if args.num_proc is not None and args.num_proc < 1:
        raise UsageError(f"--num-proc must be at least 1, got {args.num_proc}")
    sft = _sft(args)
    try:
        template = resolve_template(args.template)
    except TemplateSpecError as exc:
        raise UsageError(str(exc)) from None
    if template is None:
        raise UsageError("--template none: the cure needs a chat template (auto, a family name or a file)")
    tok = load_tokenizer(args.tokenizer)
    loaded = load_data(args.data, split=args.split)
    datasets.disable_progress_bars()  # the report is the output
    try:
        cure = AssistantOnly(tok, None if template == "auto" else template, chat_template_kwargs=kwargs)
        with contextlib.redirect_stdout(sys.stderr):
            cured = cure.apply(loaded.dataset, num_proc=args.num_proc)
    except (TemplateUnreadable, CureError) as exc:
        raise UsageError(str(exc).removeprefix("mask-monitor: ")) from None
    out = Path(args.out).expanduser()
    kind = _write(cured, out, args.force)
    n = len(cured) if hasattr(cured, "__len__") else None
    summary: dict[str, Any] = {"out": str(out), "format": kind, "examples": n,
                               "template_family": cure.tagger.template.family}
    code = EXIT_OK
    if not args.no_audit:
        with contextlib.redirect_stdout(sys.stderr):
            before = _audit(tok, args.data, args.split, sft, args.template)
            after = _audit(tok, str(out), "train", sft, args.template)
        summary["settings"] = {k: v for k, v in sft.items()}
        summary["before"], summary["after"] = _numbers(before), _numbers(after)
        if after.blocking:
            code = EXIT_FINDING
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
        return code
    print(f"wrote {n} examples to {out} ({kind}): input_ids + assistant_masks, chat template "
          f"{summary['template_family']}")
    if "before" in summary:
        width = max(len(label) for label, _ in COMPARED)
        print(f"{'':{width}}  {'before':>10}  {'after':>10}")
        for label, attr in COMPARED:
            b, a = summary["before"][attr], summary["after"][attr]
            print(f"{label:{width}}  {_fmt(attr, b):>10}  {_fmt(attr, a):>10}")
        for when in ("before", "after"):
            print(f"findings {when}: {', '.join(summary[when]['findings']) or 'none'}")
    print(f"train on it: SFTTrainer(..., train_dataset=datasets.load_from_disk({str(out)!r}), ...)"
          if kind == "save_to_disk folder" else
          f"train on it: SFTTrainer(..., train_dataset=datasets.load_dataset("
          f"{'json' if kind.startswith('jsonl') else 'parquet'!r}, data_files={str(out)!r})['train'], ...)")
    return code
