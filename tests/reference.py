"""A deliberately naive, independent edge-patched forward pass, written from the HF modules.

It shares no code with circuitgraph's engine: it loops over every destination and every source,
slices the HF weight matrices per head itself, uses HF's own norm, MLP and rotary modules, and
builds every destination input as a literal sum of source outputs plus biases.
"""

import torch

NEG = -1e30


def _family(hf):
    name = type(hf).__name__
    return {"GPT2LMHeadModel": "gpt2", "GPTNeoXForCausalLM": "neox", "TracrForCausalLM": "tracr"}.get(name, "llama")  # the rest: model.layers[i].self_attn


def _cfg(hf, name, default=None):
    return getattr(hf.config, name, default)


def _window(hf, layer):
    """Sliding window of a layer, read from the config as each family documents it."""
    w = _cfg(hf, "sliding_window")
    types = _cfg(hf, "layer_types")
    if w is None or _cfg(hf, "use_sliding_window", True) is False:
        return None
    if types is not None:
        return w if types[layer] == "sliding_attention" else None
    return w


def _post_norms(hf, layer):
    """(post-attention norm, pre-MLP norm or None, post-MLP norm) modules where the block has post-norms."""
    blk = _parts(hf)[1][layer]
    if hasattr(blk, "post_feedforward_layernorm"):
        pre_mlp = getattr(blk, "pre_feedforward_layernorm", None)
        return blk.post_attention_layernorm, pre_mlp, blk.post_feedforward_layernorm
    return None


def _parts(hf):
    fam = _family(hf)
    cfg = hf.config
    if fam == "gpt2":
        return fam, hf.transformer.h, cfg.n_head, cfg.n_embd // cfg.n_head, False
    if fam == "neox":
        return fam, hf.gpt_neox.layers, cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads, cfg.use_parallel_residual
    if fam == "tracr":
        return fam, hf.layers, cfg.num_attention_heads, cfg.head_dim, False
    dh = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return fam, hf.model.layers, cfg.num_attention_heads, dh, False


def sources_of(hf, dest_node):
    """Upstream sources of a destination node, by the rules of docs/contract.md (written out independently)."""
    fam, layers, H, _, parallel = _parts(hf)
    out = ["input"]
    if dest_node == "logits":
        upto_layer, own_heads = len(layers), False
    elif dest_node.startswith("m"):
        upto_layer, own_heads = int(dest_node[1:]), not parallel
    else:
        upto_layer, own_heads = int(dest_node[1:].split(".")[0]), False
    for l in range(upto_layer):
        out += [f"a{l}.h{h}" for h in range(H)] + [f"m{l}"]
    if own_heads:
        out += [f"a{upto_layer}.h{h}" for h in range(H)]
    return out


def _head_qkv(hf, layer, h, x_q, x_k, x_v, positions):
    fam, layers, H, dh, _ = _parts(hf)
    blk = layers[layer]
    if fam == "gpt2":
        W, b, D = blk.attn.c_attn.weight, blk.attn.c_attn.bias, x_q.shape[-1]
        cols = [slice(j * D + h * dh, j * D + (h + 1) * dh) for j in range(3)]
        q = blk.ln_1(x_q) @ W[:, cols[0]] + b[cols[0]]
        k = blk.ln_1(x_k) @ W[:, cols[1]] + b[cols[1]]
        v = blk.ln_1(x_v) @ W[:, cols[2]] + b[cols[2]]
        return q, k, v, dh**-0.5
    if fam == "neox":
        lin = blk.attention.query_key_value
        rows = [slice(h * 3 * dh + j * dh, h * 3 * dh + (j + 1) * dh) for j in range(3)]
        q = blk.input_layernorm(x_q) @ lin.weight[rows[0]].T + lin.bias[rows[0]]
        k = blk.input_layernorm(x_k) @ lin.weight[rows[1]].T + lin.bias[rows[1]]
        v = blk.input_layernorm(x_v) @ lin.weight[rows[2]].T + lin.bias[rows[2]]
        from transformers.models.gpt_neox.modeling_gpt_neox import apply_rotary_pos_emb

        cos, sin = hf.gpt_neox.rotary_emb(q, positions)
        q, k = apply_rotary_pos_emb(q[:, None], k[:, None], cos, sin)
        return q[:, 0], k[:, 0], v, dh**-0.5
    if fam == "tracr":  # no norms, no rotary
        a, sl = blk.attn, slice(h * dh, (h + 1) * dh)
        proj = lambda lin, x: x @ lin.weight[sl].T + (lin.bias[sl] if lin.bias is not None else 0)
        return proj(a.q_proj, x_q), proj(a.k_proj, x_k), proj(a.v_proj, x_v), dh**-0.5
    a = blk.self_attn
    kvh = h // (H // hf.config.num_key_value_heads)
    sl, kvsl = slice(h * dh, (h + 1) * dh), slice(kvh * dh, (kvh + 1) * dh)
    if hasattr(a, "qkv_proj"):  # Phi-3: one fused projection, q rows then k then v
        Wf = a.qkv_proj.weight
        nq, nkv = H * dh, hf.config.num_key_value_heads * dh
        Wq, Wk, Wv = Wf[:nq], Wf[nq:nq + nkv], Wf[nq + nkv:]
        bq = bk = bv = None
    else:
        Wq, Wk, Wv = a.q_proj.weight, a.k_proj.weight, a.v_proj.weight
        bq, bk, bv = a.q_proj.bias, a.k_proj.bias, a.v_proj.bias
    bias = lambda bb, s_: bb[s_] if bb is not None else 0
    pre = (lambda x: x) if not hasattr(blk, "input_layernorm") else blk.input_layernorm
    xq, xk, xv = pre(x_q), pre(x_k), pre(x_v)
    if hasattr(a, "q_norm") and a.q_norm.weight.shape[0] != dh:  # OLMo-2: the norm spans every head
        q = a.q_norm(xq @ Wq.T + (bq if bq is not None else 0))[..., sl]
        k = a.k_norm(xk @ Wk.T + (bk if bk is not None else 0))[..., kvsl]
    else:
        q = xq @ Wq[sl].T + bias(bq, sl)
        k = xk @ Wk[kvsl].T + bias(bk, kvsl)
        if hasattr(a, "q_norm"):
            q, k = a.q_norm(q), a.k_norm(k)
    v = xv @ Wv[kvsl].T + bias(bv, kvsl)
    rot = hf.model.rotary_emb
    if _cfg(hf, "model_type") == "gemma3_text":
        cos, sin = rot(q, positions, hf.config.layer_types[layer])
    else:
        cos, sin = rot(q, positions)
    q, k = _rope(q, cos, sin), _rope(k, cos, sin)
    return q, k, v, a.scaling


def _rope(x, cos, sin):
    """Rotary on the first cos.shape[-1] features, rotate-half convention, written out."""
    rd = cos.shape[-1]
    r, rest = x[..., :rd], x[..., rd:]
    half = rd // 2
    r = r * cos + torch.cat((-r[..., half:], r[..., :half]), -1) * sin
    return torch.cat((r, rest), -1)


def _head_out(hf, layer, h, z):
    fam, layers, H, dh, _ = _parts(hf)
    blk = layers[layer]
    if fam == "gpt2":
        return z @ blk.attn.c_proj.weight[h * dh:(h + 1) * dh]
    W = blk.attention.dense.weight if fam == "neox" else (blk.attn if fam == "tracr" else blk.self_attn).o_proj.weight
    return z @ W[:, h * dh:(h + 1) * dh].T


def _attn_bias(hf, layer):
    fam, layers, *_ = _parts(hf)
    blk = layers[layer]
    b = {"gpt2": lambda: blk.attn.c_proj.bias, "neox": lambda: blk.attention.dense.bias,
         "tracr": lambda: blk.attn.o_proj.bias}.get(fam, lambda: blk.self_attn.o_proj.bias)()
    return 0 if b is None else b


def _mlp(hf, layer, x):
    fam, layers, *_ = _parts(hf)
    blk = layers[layer]
    if fam == "gpt2":
        return blk.mlp(blk.ln_2(x))
    if fam == "tracr":
        return blk.mlp(x)
    post = _post_norms(hf, layer) if fam == "llama" else None
    if post is not None:
        _, pre, after = post
        return after(blk.mlp(pre(x) if pre is not None else x))
    return blk.mlp(blk.post_attention_layernorm(x))


def _embed(hf, ids):
    fam = _family(hf)
    if fam == "gpt2":
        return hf.transformer.wte(ids) + hf.transformer.wpe(torch.arange(ids.shape[1]))[None]
    if fam == "tracr":
        return hf.embed_tokens(ids) + hf.embed_positions(torch.arange(ids.shape[1]))[None]
    return (hf.gpt_neox.embed_in if fam == "neox" else hf.model.embed_tokens)(ids)  # (Gemma's module scales)


def _final(hf, x):
    fam = _family(hf)
    if fam == "gpt2":
        return hf.lm_head(hf.transformer.ln_f(x))
    if fam == "tracr":
        return hf.lm_head(x)  # no final norm
    if fam == "neox":
        return hf.get_output_embeddings()(hf.gpt_neox.final_layer_norm(x))
    logits = hf.lm_head(hf.model.norm(x))
    cap = _cfg(hf, "final_logit_softcapping")
    return logits if cap is None else torch.tanh(logits / cap) * cap


@torch.no_grad()
def patched_forward(hf, ids, ablated, in_circuit):
    """Logits of ``ids`` where each destination input at each position sums, per source,
    the patched output if ``in_circuit(src, dst) -> bool or [B, P] mask`` else ``ablated[src]``.
    Returns (logits, outputs of this run by node name)."""
    fam, layers, H, dh, parallel = _parts(hf)
    B, P = ids.shape
    positions = torch.arange(P)[None].expand(B, P)
    out = {"input": _embed(hf, ids)}
    bias_before = lambda layer: sum((_attn_bias(hf, l) for l in range(layer)), torch.zeros(()))

    def dest_input(dst, node, bias):
        total = bias + torch.zeros(B, P, out["input"].shape[-1])
        for src in sources_of(hf, node):
            keep = in_circuit(src, dst)
            keep = torch.as_tensor(keep, dtype=torch.float32)
            keep = keep[..., None] if keep.dim() == 2 else keep
            total = total + keep * out[src] + (1 - keep) * ablated.get(src, 0.0)
        return total

    for layer in range(len(layers)):
        i = torch.arange(P)
        hidden = i[None, :] > i[:, None]  # keys after the query
        if not _cfg(hf, "causal", True):  # bidirectional attention (tracr programs that need it)
            hidden = torch.zeros(P, P, dtype=torch.bool)
        if _window(hf, layer) is not None:
            hidden = hidden | (i[:, None] - i[None, :] >= _window(hf, layer))
        cap = _cfg(hf, "attn_logit_softcapping")
        head_out = {}
        for h in range(H):
            node = f"a{layer}.h{h}"
            xs = [dest_input(f"{node}<{p}>", node, bias_before(layer)) for p in "qkv"]
            q, k, v, scale = _head_qkv(hf, layer, h, *xs, positions)
            scores = (q @ k.transpose(-1, -2)) * scale
            if cap is not None:
                scores = torch.tanh(scores / cap) * cap
            scores = scores.masked_fill(hidden, NEG)
            z = scores.softmax(-1) @ v
            head_out[node] = _head_out(hf, layer, h, z)
        post = _post_norms(hf, layer) if fam == "llama" else None
        if post is not None:  # docs/engine.md, "Post-norms": w * o_h / rms(sum of this run's o_h)
            norm = post[0]
            total = sum(head_out.values())
            eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
            gain = norm.weight + (1.0 if "Gemma" in type(norm).__name__ else 0.0)
            rms = torch.sqrt(total.pow(2).mean(-1, keepdim=True) + eps)
            head_out = {n: gain * o / rms for n, o in head_out.items()}
        out.update(head_out)
        mlp_bias = bias_before(layer) + (0 if parallel else _attn_bias(hf, layer))
        out[f"m{layer}"] = _mlp(hf, layer, dest_input(f"m{layer}", f"m{layer}", mlp_bias))
    final = dest_input("logits", "logits", bias_before(len(layers)))
    return _final(hf, final), out


def node_outputs(hf, ids):
    """Outputs of every node in a plain run (every edge patched = clean)."""
    return patched_forward(hf, ids, {}, lambda s, d: True)[1]
