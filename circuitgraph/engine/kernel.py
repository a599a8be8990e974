"""The transformer block, written once, in the per-head form every run uses.

The plain run, the patched run, the probed (attribution) run and paused/resumed runs differ only
in what each head port and MLP reads; :meth:`Kernel.block` takes those inputs and does the rest
(attention with rotary, sliding windows, soft-capping and q/k norms; post-norms; the MLP), so a
model feature is implemented here or nowhere.  Node runs (:mod:`circuitgraph.engine.node_runs`)
call the same pieces (:meth:`Kernel.port_qkv`, :meth:`Kernel.attend`, :meth:`Kernel.head_outputs`,
:meth:`Kernel.mlp_out`) one node at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the per-head form is the model layer's; the engine only reads it
    from circuitgraph.model.weights import Weights


@dataclass
class BlockOut:
    """What one block computed: per-head values, attention and MLP outputs and the residual after it."""

    z: torch.Tensor  # [B, H, P, dh] per-head attention values
    attn: torch.Tensor  # [B, P, D] what attention adds to the residual (all heads, output bias, post-norm)
    inv: torch.Tensor | None  # post-attention norm statistic of this run, for head shares
    mlp: torch.Tensor  # [B, P, D] the MLP node's output
    resid: torch.Tensor  # [B, P, D] residual after the block
    pattern: torch.Tensor | None = None  # [B, H, P, P] when asked for


class Kernel:
    """Per-layer computations on :class:`~circuitgraph.model.weights.Weights`."""

    def __init__(self, weights: Weights):
        self.w = weights
        info = weights.info
        self.H, self.D, self.dh = info.n_heads, info.d_model, info.d_head
        self.parallel = info.parallel_attn_mlp

    # ----- per-run tables -----------------------------------------------------------------
    def device(self, layer: int) -> torch.device:
        """Where layer ``layer``'s weights live (models sharded with ``device_map`` span several)."""
        return self.w.layers[layer].attn.W_O.device

    def rotary(self, length: int, like: torch.Tensor) -> list:
        """Per layer ``(cos, sin)`` for positions ``0..length-1`` (or None), computed once per table and device."""
        cache, out = {}, []
        for layer, lw in enumerate(self.w.layers):
            r = lw.attn.rotary
            if r is None:
                out.append(None)
                continue
            dev = self.device(layer)
            key = (r.key, dev)
            if key not in cache:
                cache[key] = r(torch.arange(length, device=dev), like.to(dev))
            out.append(cache[key])
        return out

    # ----- attention inputs ---------------------------------------------------------------
    def shared_qkv(self, layer: int, x: torch.Tensor, watch: Callable | None = None):
        """``q [B, H, P, dh]``, ``k, v [B, H_kv, P, dh]`` when every head port reads the same ``x``.

        With ``watch`` (attribution), keys and values come per query head and ``watch(q, k, v, pre)`` sees
        the per-head projections (before per-head q/k norms and rotary) so a caller can hook their
        gradients; ``pre`` holds the un-normalised projections where one q/k norm spans every head."""
        lw = self.w.layers[layer]
        a = lw.attn
        x = x.to(self.device(layer))
        xn = lw.ln1(x) if lw.ln1 is not None else x
        q, k, v = a.project(xn)
        pre = None
        if a.qk_norm_over_heads:
            pre = (q, k)
            q, k = a.q_norm(q), a.k_norm(k)
        q, k, v = (t.unflatten(-1, (-1, self.dh)).transpose(1, 2) for t in (q, k, v))
        if watch is not None:
            if a.group > 1:
                k, v = k.repeat_interleave(a.group, 1), v.repeat_interleave(a.group, 1)
            watch(q, k, v, pre)
        if a.q_norm is not None and not a.qk_norm_over_heads:
            q, k = a.q_norm(q), a.k_norm(k)
        return q, k, v

    def port_input_grads(self, layer: int, kind: int, g: torch.Tensor, x: torch.Tensor, pre=None) -> torch.Tensor:
        """Gradients ``[H, B, P, D]`` of each head's port ``kind`` (0 q, 1 k, 2 v) with respect to that
        port's own input, from the gradient ``g [B, H, P, dh]`` of the per-head projections that
        :meth:`shared_qkv` exposed to ``watch``, all ports having read ``x``: the projection's transpose, then the
        input norm's vector-Jacobian product (one closed form for all ports, no per-port forward)."""
        lw = self.w.layers[layer]
        a = lw.attn
        W, heads = (a.W_Q, None) if kind == 0 else ((a.W_K if kind == 1 else a.W_V), torch.arange(self.H, device=g.device) // a.group)
        gh = g.transpose(0, 1).float()  # [H, B, P, dh]
        if pre is not None and kind < 2:  # a q/k norm over all heads: head h's cotangent sits in its own slice
            norm_, full = (a.q_norm, pre[0]) if kind == 0 else (a.k_norm, pre[1])
            n_slices = full.shape[-1] // self.dh
            cot = gh.new_zeros(self.H, *full.shape[:-1], n_slices, self.dh)
            idx = torch.arange(self.H, device=g.device) if kind == 0 else heads
            cot[torch.arange(self.H, device=g.device), :, :, idx] = gh
            u_full = norm_.vjp(full, cot.flatten(-2))  # [H, B, P, n_slices * dh]
            u = torch.einsum("hbpne,nde->hbpd", u_full.unflatten(-1, (n_slices, self.dh)), W.float())
        else:  # keys and values per kv head, each shared by its group of query heads (no gathered copy)
            Wf = W.float()
            u = torch.einsum("kgbpe,kde->kgbpd", gh.unflatten(0, (Wf.shape[0], -1)), Wf).flatten(0, 1)
        return u if lw.ln1 is None else lw.ln1.vjp(x, u)

    def port_weights(self, layer: int, ports: torch.Tensor):
        """``(W [n, D, dh], bias [n, dh] or None)`` of head ports ``ports`` (local index ``3 * head + {q,k,v}``),
        gathered from views of the HF parameters (nothing kept between calls)."""
        a = self.w.layers[layer].attn
        ports = ports.to(self.device(layer))
        heads, kinds = ports // 3, ports % 3
        n = len(ports)
        kind = int(kinds[0])
        one_kind = bool((kinds == kind).all())
        if one_kind and n == self.H and (kind == 0 or a.group == 1) and bool((heads == torch.arange(n, device=heads.device)).all()):
            return ((a.W_Q, a.b_Q), (a.W_K, a.b_K), (a.W_V, a.b_V))[kind]  # one kind, every head in order: the views themselves
        # gathered in the parameters' own row order (a plain row copy; a transposing copy of bf16 weights
        # measured 10-40x slower), then viewed as [n, D, dh]
        native = a.W_Q.stride(-1) != 1
        params = ((a.W_Q, a.b_Q, heads), (a.W_K, a.b_K, heads // a.group), (a.W_V, a.b_V, heads // a.group))
        if one_kind:  # a single gather
            Wk, bk, idx = params[kind]
            W = (Wk.mT if native else Wk).index_select(0, idx)
            return (W.mT if native else W), (None if bk is None else bk.index_select(0, idx))
        W = a.W_Q.new_empty(n, self.dh, self.D) if native else a.W_Q.new_empty(n, self.D, self.dh)
        bias = None
        for kind, (Wk, bk, idx) in enumerate(params):
            sel = kinds == kind
            if bool(sel.any()):
                W[sel] = (Wk.mT if native else Wk)[idx[sel]]
                if bk is not None:
                    bias = W.new_zeros(n, self.dh) if bias is None else bias
                    bias[sel] = bk[idx[sel]]
        return (W.mT if native else W), bias

    def port_qkv(self, layer: int, x: torch.Tensor, ports: torch.Tensor, weights=None) -> torch.Tensor:
        """Values ``[n, B, P, dh]`` of head ports ``ports`` (local index ``3 * head + {q,k,v}``).

        ``x`` is one input ``[B, P, D]`` that all these ports read, or one per port ``[n, B, P, D]``;
        ``weights`` is :meth:`port_weights` for these ports when the caller projects in chunks.
        """
        lw = self.w.layers[layer]
        x = x.to(self.device(layer))
        return self.project_ports(layer, lw.ln1(x) if lw.ln1 is not None else x, ports, weights)

    def project_ports(self, layer: int, xn: torch.Tensor, ports: torch.Tensor, weights=None) -> torch.Tensor:
        """:meth:`port_qkv` after the input norm: ``xn`` normalised, ``[B, P, D]`` or ``[n, B, P, D]``
        (any strides with a contiguous last axis)."""
        lw = self.w.layers[layer]
        ports = ports.to(xn.device)
        n = len(ports)
        W, bias = self.port_weights(layer, ports) if weights is None else weights
        if xn.dim() == 3:  # shared input: one matmul for all ports
            B, P, D = xn.shape
            out = (xn.reshape(B * P, D) @ W.permute(1, 0, 2).reshape(D, n * self.dh)).view(B, P, n, self.dh).permute(2, 0, 1, 3)
        else:
            B, P = xn.shape[1:3]
            out = torch.bmm(xn.reshape(n, B * P, self.D), W).view(n, B, P, self.dh)
        if bias is not None:
            out = out + bias[:, None, None, :]
        if lw.attn.q_norm is not None:
            out = self._port_qk_norm(layer, xn, ports, out)
        return out

    def _port_qk_norm(self, layer, xn, ports, out):
        a = self.w.layers[layer].attn
        heads, kinds = ports // 3, ports % 3
        for kind, norm_ in ((0, a.q_norm), (1, a.k_norm)):
            sel = torch.nonzero(kinds == kind).flatten()
            if not len(sel):
                continue
            if not a.qk_norm_over_heads:
                out[sel] = norm_(out[sel])
                continue
            # the norm spans every head: run the port's whole projection, normalise, keep its head
            Wfull, bfull = (a.W_Q, a.b_Q) if kind == 0 else (a.W_K, a.b_K)
            x = xn if xn.dim() == 3 else xn[sel]
            full = torch.einsum("...d,hde->...he", x, Wfull).flatten(-2)
            if bfull is not None:
                full = full + bfull.flatten()
            full = norm_(full).unflatten(-1, (-1, self.dh))  # [..., B, P, n_heads, dh]
            h = heads[sel] if kind == 0 else heads[sel] // a.group
            if xn.dim() == 3:
                out[sel] = full[:, :, h].permute(2, 0, 1, 3)
            else:
                out[sel] = full[torch.arange(len(sel), device=full.device), :, :, h]
        return out

    # ----- attention --------------------------------------------------------------------------
    def attend(self, layer: int, q, k, v, rope, pattern: bool = False):
        """Per-head values ``z [B, H, P, dh]`` (and the pattern when asked); ``k, v`` may be grouped."""
        a = self.w.layers[layer].attn
        if rope is not None:
            q, k = _rotate(q, rope), _rotate(k, rope)
        P = q.shape[-2]
        mask = None
        if a.window is not None or not a.causal:
            i = torch.arange(P, device=q.device)
            gap = i[:, None] - i[None, :]  # query position - key position
            mask = torch.ones(P, P, dtype=torch.bool, device=q.device)
            if a.causal:
                mask = gap >= 0
            if a.window is not None:
                mask = mask & (gap.abs() < a.window)
        # the softmax runs in float32 (as wide as any dtype below float64); a float64 model keeps float64 unless
        # its own attention rounds it to float32 (HF eager: about 1e-7 of a logit), and then the engine does too
        to32 = q.dtype == torch.float64 and a.softmax_fp32
        if a.softcap is None and not pattern and not to32:
            gqa = k.shape[1] != q.shape[1]
            if mask is None:
                return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=a.scale, enable_gqa=gqa)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=a.scale, enable_gqa=gqa)
        if k.shape[1] != q.shape[1]:
            k, v = k.repeat_interleave(a.group, 1), v.repeat_interleave(a.group, 1)
        scores = (q @ k.transpose(-1, -2)) * a.scale
        if a.softcap is not None:
            scores = torch.tanh(scores / a.softcap) * a.softcap
        if mask is None:
            i = torch.arange(P, device=q.device)
            mask = i[:, None] >= i[None, :]
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = scores.softmax(-1, dtype=torch.float64 if q.dtype == torch.float64 and not to32 else torch.float32).to(q.dtype)
        z = probs @ v
        return (z, probs) if pattern else z

    def attn_out(self, layer: int, z: torch.Tensor):
        """``(what attention adds to the residual [B, P, D], post-norm statistic or None)``."""
        lw = self.w.layers[layer]
        out = lw.attn.out(z.transpose(1, 2).flatten(2))
        if lw.post_attn is None:
            return out, None
        return lw.post_attn(out), lw.post_attn.inv_scale(out)

    def head_outputs(self, layer: int, z: torch.Tensor, heads: torch.Tensor, inv: torch.Tensor | None = None,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """Outputs ``[k, B, P, D]`` of the chosen heads: their slices of the output projection, as each
        writes into the residual (its share of a post-norm, with this run's statistic ``inv``); written
        into ``out`` (contiguous) when given."""
        lw = self.w.layers[layer]
        B, H, P, dh = z.shape
        idx = heads.to(z.device)
        zs = z[:, idx].transpose(0, 1).reshape(len(idx), B * P, dh)
        W = lw.attn.W_O if len(idx) == H and bool((idx == torch.arange(H, device=idx.device)).all()) else lw.attn.W_O[idx]
        if out is not None and lw.post_attn is None:
            _head_products(zs, W, out.view(len(idx), B * P, self.D))
            return out
        res = _head_products(zs, W).view(len(idx), B, P, self.D)
        res = res if lw.post_attn is None else lw.post_attn.share(res, inv)
        return res if out is None else out.copy_(res)

    def mlp_out(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP node's output for input ``x`` (pre-norm, MLP and post-norm)."""
        lw = self.w.layers[layer]
        out = lw.mlp(lw.ln2(x) if lw.ln2 is not None else x)
        return out if lw.post_mlp is None else lw.post_mlp(out)

    # ----- the block ----------------------------------------------------------------------------
    def block(self, layer: int, resid: torch.Tensor, rope, qkv=None, mlp_input: Callable | None = None,
              attn_override: torch.Tensor | None = None, mlp_override: torch.Tensor | None = None,
              pattern: bool = False, on_attn: Callable | None = None, tap=None,
              attn_from: Callable | None = None) -> BlockOut:
        """One block.  ``qkv`` (default: every port reads ``resid``) and ``mlp_input`` (default: the
        residual the MLP reads in the plain model) let a run give each destination its own input;
        the overrides replace a block's output by a constant (integrated gradients over activations);
        ``on_attn(z, inv)`` runs between attention and MLP (a patched MLP may read this layer's heads);
        ``attn_from(z)``, on a layer with no post-attention norm, may return the attention output
        in place of the output projection (a run that computed every head's output sums them);
        ``tap`` (:class:`~circuitgraph.engine.hooks.Tap`) reads or replaces named activations."""
        name = f"blocks.{layer}."
        dev = self.device(layer)
        if resid.device != dev:  # a sharded model: run each layer where its weights are
            resid = resid.to(dev)
            qkv = None if qkv is None else tuple(t.to(dev) for t in qkv)
            if mlp_input is not None:
                inner = mlp_input
                mlp_input = lambda mid: inner(mid).to(dev)
        if tap is not None:
            resid = tap(name + "hook_resid_pre", resid)
            pattern = pattern or tap.wants(name + "attn.hook_pattern")
        q, k, v = self.shared_qkv(layer, resid) if qkv is None else qkv
        att = self.attend(layer, q, k, v, rope, pattern)
        z, probs = att if pattern else (att, None)
        if tap is not None:
            if tap.wants(name + "attn.hook_pattern"):
                new = tap(name + "attn.hook_pattern", probs)
                if new is not probs:
                    probs, z = new, new @ (v if v.shape[1] == new.shape[1] else v.repeat_interleave(self.w.layers[layer].attn.group, 1))
            z = tap(name + "attn.hook_z", z.transpose(1, 2)).transpose(1, 2)
        attn = attn_from(z) if attn_from is not None and self.w.layers[layer].post_attn is None else None
        attn, inv = (attn, None) if attn is not None else self.attn_out(layer, z)
        if tap is not None:
            attn = tap(name + "hook_attn_out", attn)
        if on_attn is not None:
            on_attn(z, inv)
        if attn_override is not None:
            attn = attn_override
        mid = resid if self.parallel else resid + attn
        mlp = self.mlp_out(layer, mid if mlp_input is None else mlp_input(mid))
        if mlp_override is not None:
            mlp = mlp_override
        if tap is not None:
            mlp = tap(name + "hook_mlp_out", mlp)
            return BlockOut(z, attn, inv, mlp, tap(name + "hook_resid_post", resid + attn + mlp), probs)
        return BlockOut(z, attn, inv, mlp, resid + attn + mlp, probs)

    def unembed(self, resid: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of residual states, at ``positions`` (one per row) when given, on the unembedding's device."""
        if positions is not None:
            resid = resid[torch.arange(resid.shape[0], device=resid.device), positions.to(resid.device)]
        return self.w.unembed(resid.to(self.w.W_U.device))


def _head_products(z: torch.Tensor, W: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``z[h] @ W[h]`` for every head (``[k, N, dh] x [k, dh, D]``).  One batched product, except for
    half-precision weights on a CPU whose ``W[h]`` are column-major (HF's ``o_proj``): there a batched
    product first copies the weights into row-major order (measured 30x slower than the product), so
    each head goes through ``linear``, which reads them as they are."""
    if z.device.type != "cpu" or W.dtype in (torch.float32, torch.float64) or W.stride(-1) == 1:
        return torch.bmm(z, W) if out is None else torch.bmm(z, W, out=out)
    out = z.new_empty(z.shape[0], z.shape[1], W.shape[-1]) if out is None else out
    for h in range(z.shape[0]):
        torch.nn.functional.linear(z[h], W[h].mT, out=out[h])
    return out


def _rotate(x: torch.Tensor, cos_sin) -> torch.Tensor:
    """Rotary embedding on the first ``rotary_dim`` features (GPT-NeoX and Llama convention)."""
    cos, sin = cos_sin
    rd = cos.shape[-1]
    rot, keep = x[..., :rd], x[..., rd:]
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat((out, keep), dim=-1) if keep.shape[-1] else out
