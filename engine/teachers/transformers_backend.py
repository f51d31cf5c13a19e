"""Teacher backend on transformers: batched generation with left padding, top-k log-probs.

Speed: prompts are batched by token length across everything asked at once, so batches carry little
padding, and the token prefix all of them share (system part, instructions, few-shot turns) is run
once and its key/value cache reused by every batch (engine/teachers/prefix.py).

Device: teacher.device (cpu by default). On CUDA with bf16 support the weights are bf16; log-softmax
and top-k run on float32 logits either way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.models import load_causal_lm
from engine.prompts import prompt_ids
from engine.teachers import TeacherOutput, teacher_fingerprint
from engine.teachers.prefix import MIN_PREFIX, PrefixCache, cacheable, shared_prefix
from engine.train.device import autocast_dtype, resolve_device
from engine.train.sampled import draw, row_generator


@dataclass
class Tally:
    """Prompt tokens over this teacher's generate calls: what the prompts hold and what the model ran."""

    prompt_tokens: int = 0  # every prompt's full length
    prefilled_tokens: int = 0  # tokens the model ran before generating: shared prefixes once, batches with padding
    padding_tokens: int = 0  # of those, padding

    @property
    def padding_share(self) -> float:
        return self.padding_tokens / self.prefilled_tokens if self.prefilled_tokens else 0.0


def batch_plan(encoded: list[list[int]]) -> tuple[list[int], int]:
    """How one generate call batches these prompts' token ids: the order (by length; consecutive
    teacher.batch_size-long runs of it are the batches) and the length of the prefix they all share."""
    return sorted(range(len(encoded)), key=lambda i: len(encoded[i])), shared_prefix(encoded)


class TransformersTeacher:
    def __init__(self, spec_teacher, where: str = "<spec>", *, prefix_cache: bool = True):
        """prefix_cache=False: every batch runs its whole prompts (the plain path, for comparison)."""
        self.spec = spec_teacher
        self.device = resolve_device(spec_teacher.device, where, "teacher.device")  # before the load: fails fast
        self.model, self.tokenizer = load_causal_lm(spec_teacher.model)
        if self.device.type != "cpu":  # bf16 where the GPU has it (dtype None: float32 as loaded)
            self.model.to(device=self.device, dtype=autocast_dtype(self.device))
        # The device is not in the fingerprint (nor the cache keys): the same prompts give the same rows on
        # any device within float tolerance, so answers cached on one are valid on another.
        self.fingerprint = teacher_fingerprint(spec_teacher)
        self.prefix_cache = prefix_cache and cacheable(self.model)
        self.tally = Tally()

    @torch.inference_mode()
    def generate(self, prompts: list, on_batch: Callable[[list[int], list[TeacherOutput]], None] | None = None,
                 max_new_tokens: int | None = None, shared: int | None = None) -> list[TeacherOutput]:
        """One output per prompt, in order. Prompts are batched by length to limit padding (batch_plan);
        `on_batch(indices, outputs)` hears each batch as soon as it is answered. A prompt is a
        Conversation (engine.prompts) or a text (one chat user turn). `shared`: the length of the prefix
        run once for all (default: the longest these prompts share), so that a slice of a larger call,
        cut along its plan, is answered exactly as the whole call answers it."""
        encoded = [prompt_ids(self.tokenizer, p) for p in prompts]
        order, whole = batch_plan(encoded)
        shared = (whole if shared is None else shared) if self.prefix_cache else 0
        prefix = PrefixCache(self.model, encoded[0][:shared]) if shared >= MIN_PREFIX else None
        self.tally.prompt_tokens += sum(len(ids) for ids in encoded)
        self.tally.prefilled_tokens += len(prefix.ids) if prefix else 0
        outputs: list[TeacherOutput | None] = [None] * len(prompts)
        size = self.spec.batch_size
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            answered = self._generate_batch([encoded[i] for i in batch], prefix, max_new_tokens)
            for i, out in zip(batch, answered):
                outputs[i] = out
            if on_batch:
                on_batch(batch, answered)
        return outputs  # type: ignore[return-value]

    def _layout(self, batch_ids: list[list[int]], shared: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[prefix][left padding][suffix] ids and attention mask (mask 0 on the padding); without a prefix,
        plain left padding. Every prompt ends where generation starts."""
        pad = self.tokenizer.pad_token_id
        prefix = batch_ids[0][:shared]
        suffixes = [ids[shared:] for ids in batch_ids]
        width = max(len(s) for s in suffixes)
        ids = [prefix + [pad] * (width - len(s)) + s for s in suffixes]
        mask = [[1] * shared + [0] * (width - len(s)) + [1] * len(s) for s in suffixes]
        self.tally.prefilled_tokens += width * len(suffixes)
        self.tally.padding_tokens += sum(width - len(s) for s in suffixes)
        return torch.tensor(ids, device=self.device), torch.tensor(mask, device=self.device)

    def _generate_batch(self, batch_ids: list[list[int]], prefix: PrefixCache | None = None,
                        max_new_tokens: int | None = None) -> list[TeacherOutput]:
        gen = self.spec.generation
        eos = self.tokenizer.eos_token_id
        input_ids, attention = self._layout(batch_ids, len(prefix.ids) if prefix else 0)
        sampling = gen.temperature > 0
        if sampling:
            torch.manual_seed(gen.seed)  # seeds every device's generator: a re-run samples the same
        # generate reads the prefix from the cache and runs only the rest of each row; position ids come
        # from the mask's running sum, so the padding between prefix and suffix shifts nothing.
        cached = {"cache": prefix.for_batch(len(batch_ids))} if prefix else {}
        result = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens or gen.max_new_tokens,
            do_sample=sampling,
            temperature=gen.temperature if sampling else None,
            top_p=gen.top_p if sampling else None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=eos,
            output_logits=True,  # raw logits, before temperature or top-p touch them
            return_dict_in_generate=True,
            **cached,
        )
        generated = result.sequences[:, input_ids.shape[1]:]
        top_lp, top_ids, chosen_lp = self._logprobs(result.logits, generated, batch_ids)
        generated = generated.cpu()
        return [self._row(generated[b], chosen_lp[b], top_ids[b], top_lp[b], eos) for b in range(len(batch_ids))]

    def _logprobs(self, logits: tuple[torch.Tensor, ...], generated: torch.Tensor, batch_ids: list[list[int]]):
        """Per step, log-probs of the raw T=1 distribution in float32 (the logits may be bf16): the top-k
        (logprobs.mode: sampled, the distinct ids of k draws: engine/train/sampled.py) and the chosen
        token's, as [batch, steps, ...] CPU tensors. One step at a time, so no float32 copy of every
        step's whole vocabulary is ever held at once."""
        k = self.spec.logprobs.top_k
        sampled = self.spec.logprobs.mode == "sampled"
        # One generator per row, seeded by generation.seed and its prompt: a re-run draws the same ids.
        generators = [row_generator(self.spec.generation.seed, ids) for ids in batch_ids] if sampled else None
        top_lp, top_ids, chosen = [], [], []
        for step, step_logits in enumerate(logits):
            logprobs = torch.log_softmax(step_logits.float(), dim=-1)
            if sampled:
                drawn = [draw(row, k, g) for row, g in zip(logprobs, generators)]
                ids, values = torch.stack([d[0] for d in drawn]), torch.stack([d[1] for d in drawn])
            else:
                values, ids = logprobs.topk(k, dim=-1)
            top_lp.append(values)
            top_ids.append(ids)
            chosen.append(logprobs.gather(-1, generated[:, step : step + 1]).squeeze(-1))
        return (torch.stack(top_lp, 1).cpu(), torch.stack(top_ids, 1).cpu(), torch.stack(chosen, 1).cpu())

    def _row(self, ids, chosen_lp, top_ids, top_lp, eos) -> TeacherOutput:
        ids = ids.tolist()
        # Keep tokens up to and including the first eos (the student must learn to stop);
        # what follows is padding from finished rows.
        n = ids.index(eos) + 1 if eos in ids else len(ids)
        return TeacherOutput(
            finish_reason="stop" if eos in ids else "length",
            text=self.tokenizer.decode(ids[:n], skip_special_tokens=True).strip(),
            token_ids=np.asarray(ids[:n], dtype=np.int32),
            token_logprobs=chosen_lp[:n].numpy().astype(np.float32),
            topk_ids=top_ids[:n].numpy().astype(np.int32),
            topk_logprobs=top_lp[:n].numpy().astype(np.float16),
        )
