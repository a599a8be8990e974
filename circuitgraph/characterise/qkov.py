"""QK and OV circuits of a head through the embedding and unembedding (Elhage et al. 2021).

With ``E`` the token embedding and ``U`` the unembedding (``[vocab, d_model]`` both):

    QK = (E' W_Q)(E' W_K)^T          [query token, key token]: the bilinear attention score
    OV = (E' W_V W_O) U'^T           [source token, output token]: the logits a head writes
                                      when it attends to a token

where, with ``fold_ln=True`` (default), ``E'`` is ``E`` centred (LayerNorm only) and multiplied by
the head's layer-norm weight, and ``U'`` is ``U`` times the final norm's weight with the OV side
centred (LayerNorm only) -- the norms' linear parts, their data-dependent scales ignored.  The
softmax scale ``1/sqrt(d_head)`` and the biases are left out.  Both are returned as
TransformerLens ``FactoredMatrix`` (rank ``d_head``); ``.full()`` materialises the
``[vocab, vocab]`` matrix, which is the default for vocabularies up to 5000 tokens.

The *copying score* of a head is ``sum(Re eig(OV)) / sum(|eig(OV)|)`` over the OV circuit's
non-zero eigenvalues (computed on the ``d_head x d_head`` factor): near 1 for a head whose
output raises the logit of the token it attends to, near -1 for one that suppresses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import FactoredMatrix

from circuitgraph.model.loading import CircuitModel

FULL_VOCAB_LIMIT = 5000


def _head(model: CircuitModel, head: str) -> tuple[int, int]:
    ref = model.graph.ref(head, where="head")
    if not ref.is_head:
        raise ValueError(f"'{head}' is not an attention head (expected 'a<layer>.h<head>')")
    return ref.layer, ref.head


def embedding(model: CircuitModel) -> torch.Tensor:
    """Token embeddings as the model adds them to the residual (Gemma's scaling included)."""
    w = model.weights
    W_E = w.W_E if w.W_E is not None else model.hf.get_input_embeddings().weight
    return W_E if w.embed_scale == 1.0 else W_E * torch.tensor(w.embed_scale, dtype=W_E.dtype)


def _fold(x: torch.Tensor, norm, fold: bool) -> torch.Tensor:
    if not fold or norm is None:
        return x
    if norm.kind == "layer":
        x = x - x.mean(-1, keepdim=True)
    return x * norm.weight


@dataclass
class HeadCircuit:
    """A head's QK or OV circuit as a factored ``[rows, cols]`` token x token matrix."""

    kind: str  # "QK" or "OV"
    head: str
    matrix: FactoredMatrix
    row_label: str
    col_label: str
    row_ids: torch.Tensor | None = None  # token ids of the rows (None: the whole vocabulary)
    col_ids: torch.Tensor | None = None

    def full(self) -> torch.Tensor:
        """The dense ``[rows, cols]`` matrix, materialised (large when the rows or columns are a whole vocabulary)."""
        return self.matrix.AB

    def top_pairs(self, k: int = 10, tokenizer=None, chunk: int = 2048, largest: bool = True) -> list[tuple]:
        """The ``k`` largest (or smallest) entries as ``(row token, col token, value)``, computed in row chunks."""
        A, B = self.matrix.A, self.matrix.B
        best_v, best_i = torch.empty(0), torch.empty(0, dtype=torch.long)
        n_cols = B.shape[-1]
        with torch.no_grad():
            for r0 in range(0, A.shape[0], chunk):
                block = (A[r0:r0 + chunk] @ B).float().cpu().flatten()
                v, i = block.topk(min(k, block.numel()), largest=largest)
                best_v, best_i = torch.cat([best_v, v]), torch.cat([best_i, i + r0 * n_cols])
                keep = best_v.topk(min(k, len(best_v)), largest=largest).indices
                best_v, best_i = best_v[keep], best_i[keep]
        out = []
        for v, i in zip(best_v.tolist(), best_i.tolist()):
            r, c = divmod(i, n_cols)
            r = int(self.row_ids[r]) if self.row_ids is not None else r
            c = int(self.col_ids[c]) if self.col_ids is not None else c
            out.append((tokenizer.decode([r]) if tokenizer else r, tokenizer.decode([c]) if tokenizer else c, v))
        return out


def qk_circuit(model: CircuitModel, head: str, fold_ln: bool = True, tokens: torch.Tensor | None = None) -> HeadCircuit:
    """``(E' W_Q)(E' W_K)^T`` of one head; ``tokens`` restricts rows and columns to those ids."""
    layer, h = _head(model, head)
    lw = model.weights.layers[layer]
    E = _fold(embedding(model), lw.ln1, fold_ln)
    if tokens is not None:
        E = E[torch.as_tensor(tokens)]
    with torch.no_grad():
        W_Q, W_K = _qk_weights(lw.attn, h)
        fm = FactoredMatrix(E @ W_Q, (E @ W_K).T)
    return HeadCircuit("QK", head, fm, "query token", "key token", _ids(tokens), _ids(tokens))


def ov_circuit(model: CircuitModel, head: str, fold_ln: bool = True, tokens: torch.Tensor | None = None) -> HeadCircuit:
    """``(E' W_V W_O) U'^T`` of one head; ``tokens`` restricts rows and columns to those ids."""
    layer, h = _head(model, head)
    w = model.weights
    lw = w.layers[layer]
    E = _fold(embedding(model), lw.ln1, fold_ln)
    U = w.W_U
    if tokens is not None:
        E, U = E[torch.as_tensor(tokens)], U[torch.as_tensor(tokens)]
    W_O = lw.W_O[h]
    if fold_ln:
        W_O = _fold(W_O, w.ln_final, True)  # centre the written vector, then scale by the final norm's weight
    with torch.no_grad():
        fm = FactoredMatrix(E @ lw.attn.W_V[h // lw.attn.group], W_O @ U.T)
    return HeadCircuit("OV", head, fm, "source token", "output token", _ids(tokens), _ids(tokens))


def _qk_weights(attn, h: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Head ``h``'s query and key maps ``[D, dh]``, with q/k norm gains folded in where the model has
    them (the norms' per-token scaling, like the input norm's, is not a linear map and is left out)."""
    W_Q, W_K = attn.W_Q[h], attn.W_K[h // attn.group]
    if attn.q_norm is not None:
        dh = W_Q.shape[-1]
        gq, gk = attn.q_norm.gain, attn.k_norm.gain
        if attn.qk_norm_over_heads:
            gq, gk = gq.view(-1, dh)[h], gk.view(-1, dh)[h // attn.group]
        W_Q, W_K = W_Q * gq, W_K * gk
    return W_Q, W_K


def _ids(tokens):
    return None if tokens is None else torch.as_tensor(tokens)


def full_matrix(circuit: HeadCircuit, limit: int = FULL_VOCAB_LIMIT) -> torch.Tensor:
    """The materialised matrix, refusing vocabularies over ``limit`` (use ``tokens=`` or ``top_pairs``)."""
    n = circuit.matrix.A.shape[0]
    if n > limit:
        raise ValueError(f"{circuit.kind} circuit of {circuit.head} is {n} x {n}; over {limit} tokens keep it factored "
                         "(top_pairs works in chunks) or pass tokens=... to restrict it")
    return circuit.full()


@torch.no_grad()
def copying_scores(model: CircuitModel, fold_ln: bool = True, chunk: int = 4096) -> torch.Tensor:
    """``[n_layers, n_heads]`` OV copying score (module docstring), from the low-rank factors.

    The eigenvalues are those of ``ov_circuit(...).matrix.BA = W_O' U'^T E' W_V``, with the
    vocabulary-sized product ``U^T E'`` ([d_model, d_model]) formed once per kind of input norm (the
    layer's norm gain scales its columns) instead of once per head: ``chunk`` vocabulary rows at a time
    in the weights' precision, the chunks summed and the rest computed in float64."""
    G, w = model.graph, model.weights
    E, U = embedding(model), w.W_U
    products: dict[bool, torch.Tensor] = {}
    out = torch.zeros(G.n_layers, G.n_heads)
    for l in range(G.n_layers):
        lw = w.layers[l]
        norm = lw.ln1 if fold_ln else None
        centre = norm is not None and norm.kind == "layer"
        if centre not in products:
            K = torch.zeros(U.shape[1], E.shape[1], dtype=torch.float64, device=U.device)
            for r in range(0, U.shape[0], chunk):  # each chunk in the weights' precision, summed in float64
                e = E[r:r + chunk].to(U.device)
                K += (U[r:r + chunk].T @ (e - e.mean(-1, keepdim=True) if centre else e)).double()
            products[centre] = K
        UE = products[centre] * norm.weight.double() if norm is not None else products[centre]  # U^T E'
        W_O = _fold(lw.W_O, w.ln_final, fold_ln).double()  # [H, d_head, D], every head at once
        W_V = lw.attn.W_V.double().to(W_O.device).repeat_interleave(lw.attn.group, 0)  # [H, D, d_head]
        ev = torch.linalg.eigvals(W_O @ UE.to(W_O.device) @ W_V)  # [H, d_head]
        out[l] = (ev.real.sum(-1) / ev.abs().sum(-1).clamp(min=1e-12)).float().cpu()
    return out


@torch.no_grad()
def positional_qk(model: CircuitModel, head: str, n_positions: int = 32, fold_ln: bool = True) -> torch.Tensor:
    """``[query pos, key pos]`` QK circuit of learned position embeddings (GPT-2-style models), causal-masked with NaN."""
    W_pos = model.weights.W_pos
    if W_pos is None:
        raise ValueError("positional_qk needs learned absolute position embeddings (GPT-2 style); this model has none")
    layer, h = _head(model, head)
    lw = model.weights.layers[layer]
    Pm = _fold(W_pos[:n_positions], lw.ln1, fold_ln)
    W_Q, W_K = _qk_weights(lw.attn, h)
    qk = (Pm @ W_Q) @ (Pm @ W_K).T
    return qk.masked_fill(torch.ones_like(qk, dtype=torch.bool).triu(1), float("nan"))


def plot_circuit(circuit: HeadCircuit, path, tokenizer=None, ids: torch.Tensor | None = None, max_tokens: int = 40,
                 title: str | None = None):
    """Heatmap of the circuit on up to ``max_tokens`` token ids (default: the first ones of the matrix)."""
    from circuitgraph.plots import heatmap, new_figure, save

    n = circuit.matrix.A.shape[0]
    sel = torch.arange(min(n, max_tokens)) if ids is None else torch.as_tensor(ids)[:max_tokens]
    m = (circuit.matrix.A[sel] @ circuit.matrix.B[:, sel]).detach()
    rid = sel if circuit.row_ids is None else circuit.row_ids[sel]
    labels = [tokenizer.decode([int(t)]) if tokenizer else str(int(t)) for t in rid]
    fig, (ax,) = new_figure(len(sel), len(sel), cell=0.3)
    heatmap(fig, ax, m, labels, labels, title=title or f"{circuit.kind} circuit of {circuit.head}",
            xlabel=circuit.col_label, ylabel=circuit.row_label, annotate=False)
    return save(fig, path)


__all__ = ["HeadCircuit", "copying_scores", "full_matrix", "ov_circuit", "plot_circuit", "positional_qk", "qk_circuit"]
