"""DuoAttention head calibration: learn which KV heads need the whole context.

One gate ``alpha`` in [0, 1] per (layer, KV head), initialised to 1, the model
frozen. Each attention layer outputs ``alpha * full + (1 - alpha) * streaming``
per head (streaming: causal attention to ``n_sink`` first + ``window`` latest
tokens). The loss is the mean squared difference between the gated model's and
the full model's final hidden states on the answer tokens, plus
``reg * mean(|alpha|)``; AdamW, gates clamped to [0, 1] after every step. The
data is synthetic multi-passkey retrieval generated locally (passkeys are random
words at random depths of the varied filler; the answer lists them all).

    kvtools calibrate duo --model smollm2-135m --out configs/duo/smollm2-135m.tsv --steps 200 --lengths 1k,2k

The TSV (rows = layers, columns = KV heads) is what ``cache: {method: duo, pattern: ...}`` loads.
"""

from __future__ import annotations

import random
import types
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..attention.masks import causal_band, dense_mask, or_masks, sliding_window
from ..families import adapter_for


@dataclass
class CalibrationSample:
    input_ids: torch.Tensor  # [1, L]
    answer: slice  # positions whose final hidden states enter the loss


_WORDS = (
    "amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "juniper", "kelp",
    "lagoon", "meadow", "nectar", "onyx", "pepper", "quartz", "raven", "saffron", "tundra", "umber", "velvet",
    "willow", "xenon", "yarrow", "zephyr", "copper", "falcon", "glacier", "hazel", "iris", "jasper", "lotus",
    "marble", "nova", "orchid", "pine", "quill", "ridge", "sierra",
)


def multi_passkey_sample(tokenizer: Any, length: int, rng: random.Random, n_keys: int = 10) -> CalibrationSample:
    """Filler with ``n_keys`` "pass key" words at random depths; the answer lists them in order."""
    from ..eval.haystack import iter_filler

    keys = rng.sample(_WORDS, n_keys)
    answer = "The pass keys are: " + ", ".join(keys) + "."
    question = "\nList all the pass keys in the order they appeared.\n"
    budget = length - len(tokenizer(question + answer).input_ids) - 8
    filler, it, n = [], iter_filler(rng.randrange(1 << 30)), 0
    while n < budget:
        s = next(it)
        filler.append(s)
        n += len(tokenizer(" " + s).input_ids)
    spots = sorted(rng.choices(range(len(filler) + 1), k=n_keys))
    for i, (spot, key) in enumerate(zip(reversed(spots), reversed(keys))):
        filler.insert(spot, f"The pass key number {n_keys - i} is {key}.")
    prompt = " ".join(filler) + question
    p_ids = tokenizer(prompt).input_ids
    a_ids = tokenizer(answer, add_special_tokens=False).input_ids
    ids = (p_ids + a_ids)[: length]
    start = min(len(p_ids), len(ids) - 1)
    return CalibrationSample(torch.tensor([ids]), slice(start, len(ids)))


@contextmanager
def gated_attention(model: Any, gates: torch.Tensor, n_sink: int, window: int):
    """Replace attention forwards (on the instance) by the alpha-gated full/streaming mix; restore after."""
    adapter = adapter_for(model)
    modules = adapter.attention_modules(model)
    saved = [m.__dict__.get("forward") for m in modules]

    def make(i: int):
        layer_window = adapter.sliding_window(model, getattr(modules[i], "layer_idx", i))

        def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
            q, k, v = adapter.project(self, hidden_states)
            q, k = adapter.rope(self, q, k, position_embeddings)
            b, h, l, d = q.shape
            hk = k.shape[1]
            ar = torch.arange(l, device=q.device)
            causal = dense_mask(causal_band(layer_window), 1, 1, ar, ar)[0, 0]
            stream = causal & dense_mask(or_masks(lambda b, h, qi, ki: ki < n_sink, sliding_window(window)),
                                         1, 1, ar, ar)[0, 0]
            scale = adapter.scale(self)
            full = F.scaled_dot_product_attention(q, k, v, attn_mask=causal, scale=scale, enable_gqa=h != hk)
            strm = F.scaled_dot_product_attention(q, k, v, attn_mask=stream, scale=scale, enable_gqa=h != hk)
            a = gates[i].repeat_interleave(h // hk).view(1, h, 1, 1).to(q.dtype)
            return adapter.output(self, a * full + (1 - a) * strm), None

        return forward

    try:
        for i, m in enumerate(modules):
            m.forward = types.MethodType(make(i), m)
        yield
    finally:
        for m, old in zip(modules, saved):
            if old is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = old


def _final_hidden(model: Any, ids: torch.Tensor) -> torch.Tensor:
    base = getattr(model, "model", model)
    return base(input_ids=ids, use_cache=False).last_hidden_state


def calibrate_duo(
    model: Any,
    tokenizer: Any,
    steps: int = 200,
    lr: float = 0.02,
    reg: float = 0.05,
    lengths: tuple[int, ...] = (1024, 2048),
    n_sink: int = 64,
    window: int = 256,
    seed: int = 0,
    quiet: bool = False,
) -> tuple[torch.Tensor, list[float]]:
    """Train the gates; returns (gates [layers, KV heads] in [0, 1], loss per step)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    rng = random.Random(seed)
    n_layers = len(adapter_for(model).attention_modules(model))
    gates = torch.ones(n_layers, model.config.num_key_value_heads, requires_grad=True)
    opt = torch.optim.AdamW([gates], lr=lr, weight_decay=0.0)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    losses: list[float] = []
    try:
        bar = tqdm(range(steps), disable=quiet, desc="calibrate duo")
        for _ in bar:
            smp = multi_passkey_sample(tokenizer, rng.choice(lengths), rng)
            with torch.no_grad():
                target = _final_hidden(model, smp.input_ids)[:, smp.answer]
            with gated_attention(model, gates, n_sink, window):
                got = _final_hidden(model, smp.input_ids)[:, smp.answer]
            loss = F.mse_loss(got, target) + reg * gates.abs().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.4f}", mean_alpha=f"{float(gates.detach().mean()):.3f}")
    finally:
        for p, req in zip(model.parameters(), frozen):
            p.requires_grad_(req)
    return gates.detach().clone(), losses


def write_pattern(gates: torch.Tensor, path: str | Path, header: str = "") -> Path:
    """Write gates as the reference TSV (rows = layers, columns = KV heads); ``#`` lines are comments."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [f"# {h}" for h in header.splitlines() if h] + [
        "\t".join(f"{float(x):.6f}" for x in row) for row in gates
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
