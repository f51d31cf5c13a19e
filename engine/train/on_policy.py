"""On-policy distillation (training.on_policy), as in GKD (Agarwal et al., "On-policy distillation of
language models"): the teacher scores what the student itself writes.

Stored (or online) steps teach a student the teacher's tokens; at inference it reads its own, whose
mistakes it never learned to recover from. On an on-policy step, each student samples its own response
to each of the step's examples, from its own context as it reads it in training (student_conversations),
at training.on_policy.temperature (default 1, full vocabulary: no top-k, no top-p), up to max_new_tokens,
stopping at eos (kept, as the stored responses keep it). The local teacher then reads its own context
(teacher_contexts, as online.py) followed by exactly those tokens, teacher-forced, no grad, and its
full-vocabulary log-softmax at each of them is the target:

    loss per sampled token = T^2 * D(p_teacher,T || p_student,T)

with D training.on_policy.divergence (reverse_kl by default, the mode-seeking choice GKD recommends for
the student's own samples; forward_kl or jsd with beta), T training.loss.temperature as its schedule has
it at that step, tempered as the online path does (engine/train/losses.py: divergence_per_token). There
is no hard-label CE on these tokens (they are the student's own: there is no teacher token to imitate),
so kd_weight and hard_weight do not apply and the step's `hard` component is 0; token weights and
kd_target: options do not apply either. With training.loss.hidden the teacher's hidden states over the
same ids are read as on any other step.

Which steps: optimizer step s is on-policy when a uniform drawn from sha256(training.seed, s) is below
`share` (share 1: every step). Each student's sampling is seeded the same way from (seed, step, student,
micro-batch) and runs in a forked torch RNG. Nothing here holds generator state, so a run resumed from a
checkpoint takes the same on-policy steps and samples the same tokens as an uninterrupted one, and the
run's own RNG streams (batch order, dropout) are untouched.

Students share the teacher's tokenizer: a student with a trimmed vocabulary (from_teacher.vocab) is
refused, as is a teacher behind a server, which cannot score tokens it did not write.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace

import torch

from engine.errors import SpecError
from engine.train.data import Encoded, collate, response_logits
from engine.train.device import autocast, to_device
from engine.train.losses import LossParts, divergence_per_token
from engine.train.online import with_teacher_signal
from engine.train.sampled import trimmed_students


def check_on_policy(spec, where: str) -> None:
    """Before anything loads: on_policy needs the students' full vocabulary (a teacher behind a server is
    refused as the spec is read: engine/spec.py)."""
    if spec.training.on_policy is None:
        return
    trimmed = trimmed_students(spec.students)
    if trimmed:
        raise SpecError(f"{where}: training.on_policy: the teacher scores the students' samples over its full "
                        f"vocabulary, but student {trimmed[0]!r} has a trimmed vocabulary (from_teacher.vocab): "
                        "train it without on_policy")


def _uniform(*key) -> float:
    """A uniform in [0, 1) that depends on `key` alone."""
    digest = hashlib.sha256(":".join(map(str, ("on_policy", *key))).encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64


def is_on_policy_step(seed: int, step: int, share: float) -> bool:
    return _uniform(seed, step) < share


def sampling_seed(seed: int, step: int, student: str, micro: int) -> int:
    """The torch seed of one student's samples for one micro-batch of one step."""
    return int(_uniform(seed, step, student, micro) * 2**63)


def sample_responses(model, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, eos_id: int,
                     pad_id: int, seed: int, device: torch.device) -> list[list[int]]:
    """Per prompt, the tokens `model` samples after it (full vocabulary at `temperature`), up to and with
    the first eos. Prompts are padded on the left for generate; the caller's RNG state is left as it was."""
    width = max(map(len, prompts))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids):] = torch.tensor(ids)
        attention[i, width - len(ids):] = 1
    training = model.training
    model.eval()  # no dropout while sampling
    cuda = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda), torch.no_grad(), autocast(device):
            torch.manual_seed(seed)
            out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=True,
                                 temperature=temperature, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                                 eos_token_id=eos_id, pad_token_id=pad_id)
    finally:
        model.train(training)
    return [_through_eos(row[width:].tolist(), eos_id) for row in out]


def _through_eos(tokens: list[int], eos_id: int) -> list[int]:
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def with_sampled_response(example: Encoded, tokens: list[int]) -> Encoded:
    """The example with the student's tokens as its response. Its top-k is a placeholder (each token
    itself at log-prob 0) that collate needs and the on-policy loss never reads."""
    return replace(example, token_ids=tokens, topk_ids=[[t] for t in tokens], topk_logprobs=[[0.0]] * len(tokens),
                   answer_from=0, options=None)


def on_policy_loss(model, batch: dict[str, torch.Tensor], temperature: float, divergence: str,
                   beta: float) -> LossParts:
    """T^2 * D(teacher || student) per sampled token, averaged; no hard CE (the tokens are the student's own)."""
    student = response_logits(model, batch).float().log_softmax(-1)
    per_token = divergence_per_token(batch["teacher_log_probs"], student, temperature, divergence, beta)
    kd = per_token.mean() * temperature**2
    return LossParts(kd, kd.detach(), torch.zeros_like(kd.detach()), int(student.shape[0]))


@dataclass
class Tally:
    """One student's on-policy record (kept in checkpoints)."""
    steps: int = 0
    responses: int = 0
    tokens: int = 0
    sampling_seconds: float = 0.0
    scoring_seconds: float = 0.0


class OnPolicyBatches:
    """Decides the on-policy steps and builds their micro-batches: each student's own samples, scored by the
    teacher (kept on the device, no grad) and, with training.loss.hidden, its hidden states over them."""

    def __init__(self, spec, teacher, tokenizer, device: torch.device, teacher_layers: list[int]):
        self.cfg = spec.training.on_policy
        self.seed = spec.training.seed
        self.max_new_tokens = self.cfg.max_new_tokens or spec.teacher.generation.max_new_tokens
        self.teacher, self.device, self.teacher_layers = teacher, device, teacher_layers
        self.eos_id, self.pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
        self.tallies = {s.name: Tally() for s in spec.students}

    def takes(self, step: int) -> bool:
        return is_on_policy_step(self.seed, step, self.cfg.share)

    def micro_batches(self, model, student: str, examples: list[list[Encoded]], step: int) -> list[dict]:
        """The step's micro-batches (lists of examples) with `model`'s own responses and the teacher's targets."""
        tally = self.tallies[student]
        tally.steps += 1
        out = []
        for micro, chunk in enumerate(examples):
            began = time.perf_counter()
            sampled = sample_responses(model, [e.prompt_ids for e in chunk], max_new_tokens=self.max_new_tokens,
                                       temperature=self.cfg.temperature, eos_id=self.eos_id, pad_id=self.pad_id,
                                       seed=sampling_seed(self.seed, step, student, micro), device=self.device)
            scored = time.perf_counter()
            batch = to_device(collate([with_sampled_response(e, t) for e, t in zip(chunk, sampled)], self.pad_id),
                              self.device)
            out.append(with_teacher_signal(self.teacher, batch, self.teacher_layers, online=True))
            tally.sampling_seconds += scored - began
            tally.scoring_seconds += time.perf_counter() - scored
            tally.responses += len(sampled)
            tally.tokens += sum(map(len, sampled))
        return out

    def metrics(self, student: str) -> dict:
        tally = self.tallies[student]
        return {"share": self.cfg.share, "max_new_tokens": self.max_new_tokens, "temperature": self.cfg.temperature,
                "divergence": self.cfg.divergence, "steps": tally.steps, "sampled_responses": tally.responses,
                "mean_sampled_length": round(tally.tokens / tally.responses, 3) if tally.responses else None,
                "sampling_seconds": round(tally.sampling_seconds, 3),
                "scoring_seconds": round(tally.scoring_seconds, 3)}

    def state_dict(self) -> dict:
        return {name: vars(tally).copy() for name, tally in self.tallies.items()}

    def load_state_dict(self, state: dict) -> None:
        self.tallies = {name: Tally(**saved) for name, saved in state.items()}
