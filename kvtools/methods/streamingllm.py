"""StreamingLLM (Xiao et al., 2023): attention sinks + a recent window.

Keep each row's first ``n_sink`` real tokens and its most recent ``window``
tokens; evict everything between. Decoding evicts *before* appending so the
new token attends to exactly ``n_sink + window`` slots (as the reference does);
a prompt longer than that is attended densely and then evicted.

``positions: cache`` re-rotates kept keys to their in-cache positions
(0..S-1, by the RoPE delta; rotations compose) and rotates the queries the same
way, so the model never sees a position beyond its cache size and can stream
past its trained context. ``positions: original`` keeps HF's absolute positions.
"""

from __future__ import annotations

import torch

from ..attention.rope import rotate
from ..cache import SlotLayer, Step
from ..config import StreamingLLMCache
from .base import CachePolicy, LayerInfo
from .common import keep_first_last, resolve_tokens, valid_rank


class StreamingLLMPolicy(CachePolicy):
    cfg: StreamingLLMCache

    def _capacity(self, layer: SlotLayer, step: Step) -> torch.Tensor:
        """Slots per row [B]: n_sink + window (a fractional window resolves on the first prompt)."""
        cap = layer.state.get("capacity")
        if cap is None:
            window = resolve_tokens(self.cfg.window, step.prompt_real.to(step.valid.device))
            cap = self.cfg.n_sink + window.clamp(min=1)
            layer.state["capacity"] = cap
        return cap

    def _evict_to(self, layer: SlotLayer, target: torch.Tensor) -> None:
        """Keep the sinks and the most recent ``target - n_sink`` slots of each row."""
        if layer.size == 0:
            return
        n = layer.valid.sum(-1)  # [B, Hk]
        if bool((n <= target[:, None]).all()):
            return
        recent = (target - self.cfg.n_sink).clamp(min=0)
        layer.keep(keep_first_last(layer.valid, self.cfg.n_sink, recent))

    def before_append(self, layer: SlotLayer, step: Step, info: LayerInfo) -> None:
        cap = self._capacity(layer, step)
        self._evict_to(layer, cap - step.valid.sum(-1))

    def align_queries(self, layer: SlotLayer, q: torch.Tensor, step: Step, info: LayerInfo) -> torch.Tensor:
        if self.cfg.positions != "cache":
            return q
        target = torch.where(layer.valid, valid_rank(layer.valid), layer.pos)  # [B, Hk, S]
        delta = target - layer.pos
        if bool(delta.any()):
            layer.keys = rotate(layer.keys, delta, info.inv_freq)
            layer.pos = target
        # the new tokens are the last Lq slots; their queries move by the same delta as their keys
        lq = step.q_len
        b, h, _, d = q.shape
        hk = layer.keys.shape[1]
        q_delta = (target[:, :, -lq:] - step.pos[:, None, :].to(target.device))  # [B, Hk, Lq]
        q_delta = torch.where(step.valid[:, None, :], q_delta, torch.zeros_like(q_delta))
        if not bool(q_delta.any()):
            return q
        qg = q.view(b, hk, h // hk, lq, d)
        return rotate(qg, q_delta[:, :, None, :], info.inv_freq).view(b, h, lq, d)

    def after_attend(self, layer: SlotLayer, q: torch.Tensor, step: Step, info: LayerInfo) -> None:
        self._evict_to(layer, self._capacity(layer, step))
