"""Log-probabilities as requests see them: of sampled tokens, and of prompt tokens scored chunk by
chunk as SplitFuse computes each prompt.

For prompts, only the token rows of requests that ask (SamplingParams.prompt_logprobs) go through lm_head for
every position; each step's rows are log-softmaxed on their own and only the prompt token's
log-probability and the top-N alternatives are kept, so no [prompt x vocab] tensor is ever held.
The hidden state at position p scores prompt token p + 1; the prompt's last position is the row
that samples the first generated token, scored by the sampler as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from splitfuse.core.request import Sequence, TokenLogprob
from splitfuse.core.sampler import compute_logprobs
from splitfuse.core.scheduler import StepPlan


@dataclass
class PromptRows:
    """The rows of one step's hidden states [T, H] that score prompt tokens, in plan order."""

    rows: list[int] = field(default_factory=list)  # token rows of the step
    targets: list[int] = field(default_factory=list)  # the prompt token each row scores
    owners: list[tuple[Sequence, int]] = field(default_factory=list)  # (sequence, its number of rows)


def prompt_rows(plan: StepPlan) -> PromptRows | None:
    """The rows of this step that score prompt tokens not scored yet; None when no request asks."""
    scored = PromptRows()
    offset = 0
    for item in plan.items:
        seq = item.sequence
        if seq.params.prompt_logprobs is not None:
            # after a preemption the prompt is computed again: its scored positions are not redone
            start = max(seq.num_computed, len(seq.prompt_logprobs))
            stop = min(seq.num_computed + item.num_tokens, seq.num_prompt_tokens - 1)
            if stop > start:
                first = offset + start - seq.num_computed
                scored.rows += range(first, first + stop - start)
                scored.targets += seq.prompt_ids[start + 1:stop + 1]
                scored.owners.append((seq, stop - start))
        offset += item.num_tokens
    return scored if scored.owners else None


def token_logprobs(logits: torch.Tensor, tokens: list[int], wants: list[int | None]) -> list[TokenLogprob | None]:
    """Per row of logits [R, V]: the log-probability of tokens[row] and its wants[row] most likely
    alternatives; None for rows whose want is None."""
    num_top = max((w for w in wants if w is not None), default=-1)
    if num_top < 0:
        return [None] * len(wants)
    targets = torch.tensor(tokens, dtype=torch.int64, device=logits.device)
    chosen, top_values, top_ids = compute_logprobs(logits, targets, num_top)
    chosen = chosen.tolist()
    top_values = top_values.tolist() if top_values is not None else None
    top_ids = top_ids.tolist() if top_ids is not None else None
    out: list[TokenLogprob | None] = []
    for row, want in enumerate(wants):
        if want is None:
            out.append(None)
            continue
        top = dict(zip(top_ids[row][:want], top_values[row][:want])) if want and top_ids else {}
        out.append(TokenLogprob(token_id=int(tokens[row]), logprob=chosen[row], top=top))
    return out


def record_prompt_logprobs(scored: PromptRows, logits: torch.Tensor) -> None:
    """Append each owner's prompt-token log-probabilities, from the logits [R, V] of scored.rows."""
    wants = [seq.params.prompt_logprobs for seq, count in scored.owners for _ in range(count)]
    entries = iter(token_logprobs(logits, scored.targets, wants))
    for seq, count in scored.owners:
        seq.prompt_logprobs.extend(next(entries) for _ in range(count))


def first_output_prompt_logprobs(seq: Sequence) -> list[TokenLogprob | None] | None:
    """What a request's first output carries: None for the first prompt token, then each scored one."""
    if seq.params.prompt_logprobs is None or seq.num_generated != 1:
        return None
    return [None, *seq.prompt_logprobs]
