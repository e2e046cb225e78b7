"""`specflash demo`: plain decoding and DFlash side by side on a few prompts, with the
same-output check and the text marked where the drafter's tokens were accepted."""

from __future__ import annotations

from dataclasses import dataclass

from .runtime.config import DecodeConfig
from .runtime.decode import GenerationResult, SpeculativeDecoder
from .hf.target import TargetModel

DEMO_PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome.",
    "Explain in three sentences why the sky is blue.",
    "List five tips for writing clear emails.",
)

ACCEPTED_ON = "\033[4;32m"  # underlined green
ACCEPTED_OFF = "\033[0m"


@dataclass
class DemoRow:
    prompt: str
    plain: GenerationResult
    spec: GenerationResult

    @property
    def same(self) -> bool:
        return self.plain.token_ids == self.spec.token_ids

    @property
    def speedup(self) -> float | None:
        a, b = self.plain.stats.tpot_s, self.spec.stats.tpot_s
        return a / b if a and b else None


def accepted_mask(result: GenerationResult) -> list[bool]:
    """Per output token: was it a draft token the target accepted (vs. the target's own)?"""
    mask: list[bool] = []
    for step in result.steps:
        mask.extend(i < step.num_accepted for i in range(len(step.tokens)))
    return mask


def marked_text(target: TargetModel, result: GenerationResult, color: bool) -> str:
    """The output text with accepted draft tokens underlined (colour) or in «...» (plain)."""
    pieces, previous = [], ""
    flags = accepted_mask(result)
    for i in range(len(result.token_ids)):
        text = target.decode(result.token_ids[: i + 1])
        pieces.append((text[len(previous):], flags[i] if i < len(flags) else False))
        previous = text
    on, off = (ACCEPTED_ON, ACCEPTED_OFF) if color else ("«", "»")
    out, inside = [], False
    for piece, accepted in pieces:
        if accepted != inside:
            out.append(on if accepted else off)
            inside = accepted
        out.append(piece)
    if inside:
        out.append(off)
    return "".join(out)


def run_demo(target: TargetModel, spec_decoder: SpeculativeDecoder, prompts: tuple[str, ...],
             max_new_tokens: int) -> list[DemoRow]:
    plain_decoder = SpeculativeDecoder(target)
    config = DecodeConfig(max_new_tokens=max_new_tokens)
    rows = []
    warm = target.encode_prompt(prompts[0], chat=True)
    plain_decoder.generate(warm, DecodeConfig(max_new_tokens=4))  # warm-up, not timed
    spec_decoder.generate(warm, DecodeConfig(max_new_tokens=4))
    for prompt in prompts:
        ids = target.encode_prompt(prompt, chat=True)
        plain = plain_decoder.generate(ids, config, keep_steps=True)
        spec = spec_decoder.generate(ids, config, keep_steps=True)
        rows.append(DemoRow(prompt, plain, spec))
    return rows


def format_table(rows: list[DemoRow]) -> str:
    header = f"{'prompt':<42}{'plain tok/s':>12}{'dflash tok/s':>13}{'speedup':>9}{'tau':>6}{'same':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        p, s = row.plain.stats.tokens_per_s, row.spec.stats.tokens_per_s
        speed = f"{row.speedup:.2f}x" if row.speedup else "-"
        tau = f"{row.spec.stats.tau:.2f}" if row.spec.stats.tau else "-"
        prompt = row.prompt if len(row.prompt) <= 40 else row.prompt[:39] + "…"
        lines.append(f"{prompt:<42}{p or 0:>12.1f}{s or 0:>13.1f}{speed:>9}{tau:>6}{'yes' if row.same else 'NO':>6}")
    return "\n".join(lines)
