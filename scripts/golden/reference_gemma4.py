"""Independent, from-the-spec Gemma 4 text-decoder forward (no transformers import).

Written from /work/shared/docs/gemma4.md (plain torch ops, float64 by default) and used
by make_golden.py to cross-check the real Hugging Face implementation: if HF and this
file agree on the golden logits, the spec's math is what HF does.  It is also meant as
a readable, loop-free reference for the C++ implementation.

Config parsing accepts both config.json flavours:
  * release-era keys: `global_head_dim`, `num_global_key_value_heads`
  * newer transformers save format: `per_layer_config` = {"<layer idx>": {"head_dim": .., "num_key_value_heads": ..}}
    (only full-attention layers listed; idx zero-padded, e.g. "05")
"""

from __future__ import annotations

import math

import torch


def layer_geometry(cfg: dict) -> list[dict]:
    """Per-layer head_dim / num_kv_heads / kv-sharing / mlp width, as the spec describes."""
    L = cfg["num_hidden_layers"]
    types = cfg["layer_types"]
    # keys are layer indices as strings, zero-padded to the width of the largest key
    # (transformers writes "05", "11" for a 12-layer model): parse them as integers
    plc = {int(k): v for k, v in (cfg.get("per_layer_config") or {}).items()}
    k_eq_v = bool(cfg.get("attention_k_eq_v", False))
    n_shared = cfg.get("num_kv_shared_layers", 0) or 0
    first_shared = L - n_shared
    out = []
    for i, t in enumerate(types):
        full = t == "full_attention"
        d = cfg["head_dim"]
        nkv = cfg["num_key_value_heads"]
        if full:
            if plc:
                o = plc.get(i, {})
                d = o.get("head_dim", d)
                nkv = o.get("num_key_value_heads", nkv)
            else:
                d = cfg.get("global_head_dim") or 512
                if k_eq_v and cfg.get("num_global_key_value_heads") is not None:
                    nkv = cfg["num_global_key_value_heads"]
        shared = n_shared > 0 and i >= first_shared
        src = None
        if shared:
            # last non-shared layer of the same type
            src = max(j for j in range(first_shared) if types[j] == t)
        inter = cfg["intermediate_size"] * (2 if (cfg.get("use_double_wide_mlp") and shared) else 1)
        out.append(dict(type=t, full=full, d=d, nkv=nkv, shared=shared, src=src, inter=inter,
                        k_eq_v=k_eq_v and full))
    return out


def rms_norm(x, w=None, eps=1e-6):
    y = x * torch.pow(x.pow(2).mean(-1, keepdim=True) + eps, -0.5)
    return y * w if w is not None else y


def gelu_tanh(z):
    return 0.5 * z * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z.pow(3))))


def rope_inv_freq(d: int, params: dict, dtype, ablate: dict | None = None) -> torch.Tensor:
    theta = params["rope_theta"]
    if params.get("rope_type", "default") == "proportional":
        n_rot = int(params.get("partial_rotary_factor", 1.0) * d // 2)
        i = torch.arange(n_rot, dtype=dtype)
        denom = 2 * n_rot if (ablate or {}).get("rope_denominator_rotated") else d
        rot = 1.0 / theta ** (2 * i / denom)  # spec: exponent over the FULL head dim
        return torch.cat([rot, torch.zeros(d // 2 - n_rot, dtype=dtype)])
    i = torch.arange(d // 2, dtype=dtype)
    return 1.0 / theta ** (2 * i / d)


def apply_rope(x, pos, inv_freq):
    # x [B,S,h,d]; NeoX rotate-half pairing (i, i+d/2)
    ang = pos[:, None].to(x.dtype) * inv_freq[None, :]  # [S, d/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1)[None, :, None, :]
    sin = torch.cat([ang.sin(), ang.sin()], -1)[None, :, None, :]
    h = x.shape[-1] // 2
    rot = torch.cat([-x[..., h:], x[..., :h]], -1)
    return x * cos + rot * sin


def forward(cfg: dict, sd: dict[str, torch.Tensor], input_ids: torch.Tensor, dtype=torch.float64,
            prefix: str = "model.", return_hidden: bool = False, ablate: dict | None = None):
    """Returns logits (after soft-cap) [B,S,V] and optionally the list of per-layer outputs.

    `ablate` switches on deliberately WRONG alternatives (used only to prove that the
    golden data is sensitive to each spec detail): window_offset (int), rope_denominator_rotated,
    kv_share_first_layer (source = first instead of last non-shared layer of the type),
    k_eq_v_normed_k (V = k_norm(k) instead of v_norm(k_raw)), layer_scalar_residual_only
    (scale only the branches, not the residual), router_no_renorm, router_no_per_expert_scale,
    ple_no_ctx.
    """
    ab = ablate or {}
    W = {k: v.to(dtype) for k, v in sd.items()}
    p = lambda n: W[prefix + n]  # noqa: E731
    B, S = input_ids.shape
    H = cfg["hidden_size"]
    L = cfg["num_hidden_layers"]
    nh = cfg["num_attention_heads"]
    eps = cfg["rms_norm_eps"]
    P = cfg.get("hidden_size_per_layer_input", 0) or 0
    win = cfg["sliding_window"] + ab.get("window_offset", 0)
    geo = layer_geometry(cfg)

    x = p("embed_tokens.weight")[input_ids] * math.sqrt(H)
    hidden = [x]
    if P:
        tok = (p("embed_tokens_per_layer.weight")[input_ids] * math.sqrt(P)).reshape(B, S, L, P)
        ctx = (x @ p("per_layer_model_projection.weight").T) * H ** -0.5
        ctx = rms_norm(ctx.reshape(B, S, L, P), p("per_layer_projection_norm.weight"), eps)
        ple = (ctx * (0.0 if ab.get("ple_no_ctx") else 1.0) + tok) * 2 ** -0.5

    pos = torch.arange(S)
    q_idx = pos[:, None]
    k_idx = pos[None, :]
    causal = k_idx <= q_idx
    sliding = causal & (k_idx > q_idx - win)
    kv_store: dict[int, tuple] = {}

    for i, g in enumerate(geo):
        pre = f"layers.{i}."
        lp = lambda n: p(pre + n)  # noqa: E731
        d, nkv = g["d"], g["nkv"]
        inv = rope_inv_freq(d, cfg["rope_parameters"][g["type"]], dtype, ab)

        a = rms_norm(x, lp("input_layernorm.weight"), eps)
        q = (a @ lp("self_attn.q_proj.weight").T).view(B, S, nh, d)
        q = apply_rope(rms_norm(q, lp("self_attn.q_norm.weight"), eps), pos, inv)
        if g["shared"]:
            src = g["src"]
            if ab.get("kv_share_first_layer"):
                src = min(j for j in kv_store if geo[j]["type"] == g["type"])
            k, v = kv_store[src]
        else:
            kraw = (a @ lp("self_attn.k_proj.weight").T).view(B, S, nkv, d)
            vraw = kraw if g["k_eq_v"] else (a @ lp("self_attn.v_proj.weight").T).view(B, S, nkv, d)
            k = apply_rope(rms_norm(kraw, lp("self_attn.k_norm.weight"), eps), pos, inv)
            v = rms_norm(vraw, None, eps)
            if g["k_eq_v"] and ab.get("k_eq_v_normed_k"):
                v = rms_norm(kraw, lp("self_attn.k_norm.weight"), eps)
            kv_store[i] = (k, v)
        rep = nh // k.shape[2]
        kk = k.repeat_interleave(rep, dim=2)
        vv = v.repeat_interleave(rep, dim=2)
        scores = torch.einsum("bthd,bshd->bhts", q, kk)  # scale 1.0
        mask = causal if g["full"] else sliding
        scores = scores.masked_fill(~mask, float("-inf"))
        prob = torch.softmax(scores, -1)
        o = torch.einsum("bhts,bshd->bthd", prob, vv).reshape(B, S, nh * d)
        attn = o @ lp("self_attn.o_proj.weight").T
        x1 = x + rms_norm(attn, lp("post_attention_layernorm.weight"), eps)

        y = rms_norm(x1, lp("pre_feedforward_layernorm.weight"), eps)
        m = (gelu_tanh(y @ lp("mlp.gate_proj.weight").T) * (y @ lp("mlp.up_proj.weight").T)) @ lp("mlp.down_proj.weight").T
        if cfg.get("enable_moe_block"):
            m1 = rms_norm(m, lp("post_feedforward_layernorm_1.weight"), eps)
            r = rms_norm(x1, None, eps) * lp("router.scale") * H ** -0.5
            probs = torch.softmax(r @ lp("router.proj.weight").T, -1)
            topv, topi = torch.topk(probs, cfg["top_k_experts"], dim=-1)
            w = topv if ab.get("router_no_renorm") else topv / topv.sum(-1, keepdim=True)
            if not ab.get("router_no_per_expert_scale"):
                w = w * lp("router.per_expert_scale")[topi]
            ye = rms_norm(x1, lp("pre_feedforward_layernorm_2.weight"), eps)
            GU = lp("experts.gate_up_proj")  # [E, 2Ie, H]
            D = lp("experts.down_proj")  # [E, H, Ie]
            Ie = D.shape[-1]
            gu = torch.einsum("bsh,eoh->bseo", ye, GU)  # all experts (tiny models only)
            he = gelu_tanh(gu[..., :Ie]) * gu[..., Ie:]
            oe = torch.einsum("bsei,ehi->bseh", he, D)  # [B,S,E,H]
            sel = torch.gather(oe, 2, topi[..., None].expand(*topi.shape, H))
            m2 = (sel * w[..., None]).sum(2)
            m2 = rms_norm(m2, lp("post_feedforward_layernorm_2.weight"), eps)
            m = m1 + m2
        x2 = x1 + rms_norm(m, lp("post_feedforward_layernorm.weight"), eps)
        if P:
            gte = gelu_tanh(x2 @ lp("per_layer_input_gate.weight").T) * ple[:, :, i, :]
            x2 = x2 + rms_norm(gte @ lp("per_layer_projection.weight").T, lp("post_per_layer_input_norm.weight"), eps)
        if ab.get("layer_scalar_residual_only"):
            x = x + (x2 - x) * lp("layer_scalar")
        else:
            x = x2 * lp("layer_scalar")
        hidden.append(x)

    h = rms_norm(x, p("norm.weight"), eps)
    logits = h @ p("embed_tokens.weight").T
    cap = cfg.get("final_logit_softcapping")
    if cap:
        logits = cap * torch.tanh(logits / cap)
    if return_hidden:
        return logits, hidden, h
    return logits


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE over labels != -100 (HF ForCausalLMLoss without num_items_in_batch)."""
    lg = logits[:, :-1, :].reshape(-1, logits.shape[-1])
    lb = labels[:, 1:].reshape(-1)
    keep = lb != -100
    lse = torch.logsumexp(lg[keep], -1)
    return (lse - lg[keep].gather(1, lb[keep][:, None])[:, 0]).mean()
