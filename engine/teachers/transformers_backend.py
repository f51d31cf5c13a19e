"""Teacher backend on transformers: batched generation with left padding, top-k log-probs."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from engine.models import load_causal_lm
from engine.prompts import prompt_ids
from engine.teachers import TeacherOutput, teacher_fingerprint


class TransformersTeacher:
    def __init__(self, spec_teacher):
        self.spec = spec_teacher
        self.model, self.tokenizer = load_causal_lm(spec_teacher.model)
        self.fingerprint = teacher_fingerprint(spec_teacher)

    @torch.inference_mode()
    def generate(self, prompts: list, on_batch: Callable[[list[int], list[TeacherOutput]], None] | None = None,
                 max_new_tokens: int | None = None) -> list[TeacherOutput]:
        """One output per prompt, in order. Prompts are batched by length to limit padding;
        `on_batch(indices, outputs)` hears each batch as soon as it is answered. A prompt is a
        Conversation (engine.prompts) or a text (one chat user turn)."""
        encoded = [prompt_ids(self.tokenizer, p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        outputs: list[TeacherOutput | None] = [None] * len(prompts)
        size = self.spec.batch_size
        for start in range(0, len(order), size):
            batch = order[start : start + size]
            answered = self._generate_batch([encoded[i] for i in batch], max_new_tokens)
            for i, out in zip(batch, answered):
                outputs[i] = out
            if on_batch:
                on_batch(batch, answered)
        return outputs  # type: ignore[return-value]

    def _generate_batch(self, batch_ids: list[list[int]], max_new_tokens: int | None = None) -> list[TeacherOutput]:
        gen = self.spec.generation
        pad = self.tokenizer.pad_token_id
        eos = self.tokenizer.eos_token_id
        width = max(len(ids) for ids in batch_ids)
        # Left padding: every prompt ends where generation starts.
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch_ids])
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch_ids])
        sampling = gen.temperature > 0
        if sampling:
            torch.manual_seed(gen.seed)
        result = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens or gen.max_new_tokens,
            do_sample=sampling,
            temperature=gen.temperature if sampling else None,
            top_p=gen.top_p if sampling else None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=eos,
            output_logits=True,  # raw logits, before temperature or top-p touch them
            return_dict_in_generate=True,
        )
        generated = result.sequences[:, width:]
        # [batch, steps, vocab] -> log-probs of the raw T=1 distribution, in float32.
        logprobs = torch.log_softmax(torch.stack(result.logits, dim=1).float(), dim=-1)
        top_lp, top_ids = logprobs.topk(self.spec.logprobs.top_k, dim=-1)
        chosen_lp = logprobs.gather(-1, generated.unsqueeze(-1)).squeeze(-1)
        return [self._row(generated[b], chosen_lp[b], top_ids[b], top_lp[b], eos) for b in range(len(batch_ids))]

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
