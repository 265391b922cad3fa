"""Frozen backbones written from scratch (ViT, AST), loaders for real checkpoints, and the
audio-visual model."""
import argparse
import contextlib
import json
import math
import os
import re
import zipfile
from collections import OrderedDict
import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from adapters import MoE, TokenFusion, balance_loss, orthogonality_loss

# ----------------------------------------------------------------------------- backbones


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection, as in timm."""

    def __init__(self, dim, heads):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, N, D = x.shape
        # 3 x (B, h, N, D/h)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, h, N, D/h)
        return self.proj(x.transpose(1, 2).reshape(B, N, D))  # (B, N, D)


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, dim, heads, mlp_dim, eps):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=eps)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=eps)
        self.mlp = nn.Sequential(OrderedDict(fc1=nn.Linear(dim, mlp_dim), act=nn.GELU(),
                                             fc2=nn.Linear(mlp_dim, dim)))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def sublayer(self, name, x):
        """attn(ln1(x)) or mlp(ln2(x)) alone, for an adapter that wraps one sub-layer (AVMoE
        insertion)."""
        return self.attn(self.norm1(x)) if name == "attn" else self.mlp(self.norm2(x))


class Encoder(nn.Module):
    """What ViT and AST share: prefix tokens + position embedding, a stack of blocks, a final
    LayerNorm."""

    def __init__(self, in_chans, dim, depth, heads, mlp_dim, eps, patch, stride, grid, prefix):
        super().__init__()
        self.dim, self.grid = dim, grid
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, stride)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, prefix + grid[0] * grid[1], dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_dim, eps) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=eps)

    def prefix_tokens(self):
        return self.cls_token

    def embed(self, x):
        """Backbone input (B, ...) -> tokens with position embedding (B, prefix + N, D)."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, D)
        return torch.cat([self.prefix_tokens().expand(len(x), -1, -1), x], 1) + self.pos_embed

    def block_outputs(self, x):
        """Backbone input (B, ...) -> each block's output in turn, before the final LayerNorm (B,
        prefix + N, D)."""
        x = self.embed(x)
        for blk in self.blocks:
            x = blk(x)
            yield x

    def forward_features(self, x):
        *_, last = self.block_outputs(x)
        return self.norm(last)


class ViT(Encoder):
    """Vision Transformer: images (B, 3, H, W) -> tokens (B, 1 + N, D); pooled output is the class
    token."""

    def __init__(self, image_size=32, patch_size=8, dim=64, depth=4, heads=4, mlp_dim=256,
                 eps=1e-6):
        g = image_size // patch_size
        if image_size % patch_size:  # timm raises too: the conv would silently drop the edge pixels
            raise ValueError(f"image size {image_size} is not a multiple of the patch size "
                             f"{patch_size}: "
                             f"use e.g. {g * patch_size} or {(g + 1) * patch_size}")
        super().__init__(3, dim, depth, heads, mlp_dim, eps, patch_size, patch_size, (g, g),
                         prefix=1)

    def pool(self, tokens):
        return tokens[:, 0]


class AST(Encoder):
    """Audio Spectrogram Transformer: fbank (B, T, F) -> tokens (B, 2 + N, D); pooled output (x0 +
    x1) / 2."""

    def __init__(self, num_mel_bins=64, target_length=100, fstride=10, tstride=10, dim=64, depth=4,
                 heads=4, mlp_dim=256, eps=1e-6, patch_size=16):
        grid = ((num_mel_bins - patch_size) // fstride + 1,
                (target_length - patch_size) // tstride + 1)
        super().__init__(1, dim, depth, heads, mlp_dim, eps, patch_size, (fstride, tstride), grid,
                         prefix=2)
        self.dist_token = nn.Parameter(torch.zeros(1, 1, dim))

    def prefix_tokens(self):
        return torch.cat([self.cls_token, self.dist_token], 1)  # (1, 2, D)

    def embed(self, x):
        # (B, 1, F, T): frequency on the rows, as in the AST repo and HF
        x = x.unsqueeze(1).transpose(2, 3)
        return super().embed(x)

    def pool(self, tokens):
        return (tokens[:, 0] + tokens[:, 1]) / 2


# -------------------------------------------------------------- the audio-visual model


@dataclasses.dataclass
class AVConfig:
    mode: str = "molt"  # "molt" (parallel late-layer tokens), "avmoe" (sequential, every layer),
                        # "frozen" (no adapters)
    modalities: str = "av"  # "av", or "a" / "v" for a unimodal baseline (one backbone, UA experts
                            # only)
    num_classes: int = 6  # event classes; the model predicts num_classes + 1, background last
    n_cma: int = 1  # cross-modal experts per mixture
    n_ua: int = 1  # unimodal experts per mixture
    latent_tokens: int = 8  # latent tokens per expert (the papers use 8 to 87)
    reduction: int = 2  # bottleneck width D / reduction: D/2 for the tiny demo backbones (the
                        # papers: D/8 at D=768)
    router_sigma: float = 0.01  # router noise std in training (AVMoE's AVS code)
    late_layers: int = 0  # MoLT: K layers per backbone; 0 = half the shallower depth (at least 1)
    molt_layers: str = "late"  # MoLT: each backbone's last K layers (the paper), the first K
                               # ("early"), or "all"
    head_dim: int = 128  # width of the shared head


CHOICES = {"mode": ("molt", "avmoe", "frozen"), "modalities": ("av", "a", "v"),
           "molt_layers": ("late", "early", "all")}
# Every number is at least 1, or at least 0 for the floats and these (0: none, or as a file says;
# train.Config adds the seed and the heads flags), and below 2 ** 32: a seed's range, which also
# keeps timedelta and the sizes finite
MAY_BE_ZERO = ("seed", "n_cma", "n_ua", "late_layers", "vit_heads", "ast_heads")


def check_config(cfg, choices=CHOICES):
    """The settings of cfg, a dataclass, checked in one place (AVModel and train.check, which adds
    its own choices, call it)."""
    for key, allowed in choices.items():
        if (value := getattr(cfg, key)) not in allowed:
            raise ValueError(f"{key} must be one of {', '.join(allowed)}, not {value!r}")
    for f in dataclasses.fields(cfg):
        value, least = getattr(cfg, f.name), 0 if f.type is float or f.name in MAY_BE_ZERO else 1
        if f.type in (int, float) and not least <= value < 2 ** 32:
            raise ValueError(f"{f.name}={value} must be at least {least} and below 2 ** 32")
    if cfg.molt_layers == "all" and cfg.late_layers:
        raise ValueError("late_layers does not apply to molt_layers=all: drop one of the two")
    if cfg.n_ua < 1 and not (cfg.n_cma >= 1 and cfg.modalities == "av"):
        raise ValueError("a mixture needs an expert: n_ua >= 1, or n_cma >= 1 with both modalities")


def paired_blocks(depths):
    """AVMoE with unequal depths: layer i of the deeper backbone (L layers) meets block floor(i *
    L_m / L) of stream m. -> for each i, {m: that block} for the streams whose block index moves on
    (from floor(-L_m / L) = -1 at i = 0).

    depths {m: L_m} -> a list of L = max L_m dicts, one per step i = 0 .. L - 1. The schedule is
    "first meeting": block j of stream m runs once, at the first step i whose floor(i * L_m / L)
    reaches j (floor, not rounding), so every block of every stream appears exactly once, in order.
    For example (v deeper):
      {"v": 5, "a": 2} -> [{"v": 0, "a": 0}, {"v": 1}, {"v": 2}, {"v": 3, "a": 1}, {"v": 4}]
      {"v": 4, "a": 3} -> [{"v": 0, "a": 0}, {"v": 1}, {"v": 2, "a": 1}, {"v": 3, "a": 2}]
    Equal depths meet at every step: {"v": 2, "a": 2} -> [{"v": 0, "a": 0}, {"v": 1, "a": 1}]."""
    # AVMoE insertion, unequal depths: step i runs block floor(i * L_m / L) of m if it moves on
    L = max(depths.values())
    return [{m: i * d // L for m, d in depths.items() if i * d // L > (i - 1) * d // L}
            for i in range(L)]


def chosen_layers(cfg, depths):
    """MoLT late layers: K = late_layers, or half the shallower depth (at least 1), or all of it;
    each backbone gives its last K blocks ("late"; the deeper one's last K when depths differ) or
    its first K ("early")."""
    # MoLT late layers (reconstructed): K = half the shallower depth by default; blocks L-K .. L-1
    shallow = min(depths.values())
    k = shallow if cfg.molt_layers == "all" else cfg.late_layers or max(1, shallow // 2)
    if k > shallow:
        raise ValueError(f"late_layers={k} is more than the shallower backbone's {shallow} layers")
    return {m: list(range(k)) if cfg.molt_layers == "early" else list(range(L - k, L))
            for m, L in depths.items()}


class Head(nn.Module):
    """Shared by every mode: per-segment features -> one kernel-3 temporal conv over the segments ->
    logits."""

    def __init__(self, in_dim, hidden, n_out):
        super().__init__()
        self.inp = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden))
        self.temporal = nn.Conv1d(hidden, hidden, 3, padding=1)
        self.out = nn.Linear(hidden, n_out)

    def forward(self, x):
        h = self.inp(x)  # (B, S, hidden)
        h = h + self.temporal(h.transpose(1, 2)).transpose(1, 2)  # (B, S, hidden)
        return self.out(h)  # (B, S, classes + 1)


class AVModel(nn.Module):
    """Frozen ViT + AST with AVMoE or MoLT adapters and a shared head; clips (B, S, ...) -> logits
    (B, S, C + 1)."""

    def __init__(self, cfg, vit=None, ast=None):
        super().__init__()
        check_config(cfg)
        self.cfg = cfg
        # vision first, as in the papers' figures
        self.mods = [m for m in "va" if m in cfg.modalities]
        backbone = {"v": vit, "a": ast}
        if any(backbone[m] is None for m in self.mods):
            raise ValueError(f"modalities={cfg.modalities} needs "
                             f"{'a ViT' if vit is None else 'an AST'} backbone")
        self.enc = nn.ModuleDict({m: backbone[m] for m in self.mods})
        # frozen; our blocks have no dropout, so train() changes nothing here
        self.enc.requires_grad_(False).eval()
        # None with one modality
        self.other = {m: next((o for o in self.mods if o != m), None) for m in self.mods}
        dim = {m: e.dim for m, e in self.enc.items()}
        self.depth = {m: len(e.blocks) for m, e in self.enc.items()}

        def mixtures(n, tokens=False):  # n[m] mixtures of experts for each stream m
            return nn.ModuleDict({m: nn.ModuleList(MoE(dim[m], dim.get(self.other[m]), cfg, tokens)
                                                   for _ in range(n[m])) for m in self.mods})
        # AVMoE: mixture and gate 2j of a stream wrap its block j's attention, 2j + 1 its MLP; gates
        # start at 0
        self.moe = self.gates = None
        if cfg.mode == "avmoe":
            self.moe = mixtures({m: 2 * d for m, d in self.depth.items()})
            self.gates = nn.ParameterDict({m: nn.Parameter(torch.zeros(2 * d))
                                           for m, d in self.depth.items()})
        # MoLT: the blocks whose outputs feed the adapters, their token experts, the fusion and the
        # readout
        self.layers = {m: [] for m in self.mods}
        self.tokens = self.fusion = self.readout = None
        if cfg.mode == "molt":
            self.layers = chosen_layers(cfg, self.depth)
            self.tokens = mixtures({m: len(ls) for m, ls in self.layers.items()}, tokens=True)
            self.fusion = nn.ModuleDict({m: TokenFusion(d) for m, d in dim.items()})
            # the head reads only the fused tokens (not the frozen pooled features too), so the
            # layers chosen decide what evidence it gets: what the early-vs-late ablation compares
            self.readout = nn.ModuleDict({m: nn.Sequential(nn.LayerNorm(d), nn.Linear(d, d))
                                          for m, d in dim.items()})
        self.head = Head(sum(dim.values()), cfg.head_dim, cfg.num_classes + 1)

    def router_positions(self, m):
        """Names of stream m's router positions, in the order of aux["router"][m]'s second axis
        (layers from 1)."""
        if self.cfg.mode == "avmoe":
            return [f"layer {i + 1} {sub}" for i in range(self.depth[m]) for sub in ("attn", "mlp")]
        return [f"layer {i + 1}" for i in self.layers[m]]

    def inputs(self, frames, fbank):
        """Clips (B, S, 3, H, W), (B, S, T, F) -> {m: (B*S, ...)} on the model's device, for the
        modalities it reads."""
        return {m: {"v": frames, "a": fbank}[m].flatten(0, 1).to(self.head.out.weight.device)
                for m in self.mods}

    @torch.no_grad()
    def frozen_states(self, frames, fbank):
        """The frozen backbone pass, without gradients, independent of the adapters: MoLT {m:
        {"late": the K chosen blocks' outputs before the final LayerNorm (B*S, K, N, D)}}, else {m:
        {"pooled": final features (B*S, D)}}."""
        states = {}
        for m, x in self.inputs(frames, fbank).items():
            enc, late = self.enc[m], []
            for i, h in enumerate(enc.block_outputs(x)):
                if i in self.layers[m]:
                    late.append(h)
            states[m] = ({"late": torch.stack(late, 1)} if late
                         else {"pooled": enc.pool(enc.norm(h))})
        return states

    def forward(self, frames, fbank, states=None, batch_shape=None):
        """Clips of S segments -> logits (B, S, C + 1) and aux: router weights {m: (B*S, P, E)},
        layer weights {m: (B*S, K)}, losses. MoLT and frozen may be given precomputed frozen_states
        (then batch_shape=(B, S))."""
        B, S = batch_shape or (frames if frames is not None else fbank).shape[:2]
        aux = {"router": {}, "alpha": {}, "orth": torch.zeros(()), "balance": torch.zeros(())}
        if self.cfg.mode == "avmoe":
            feats = self.avmoe(self.inputs(frames, fbank), aux)
        else:
            states = states if states is not None else self.frozen_states(frames, fbank)
            if self.cfg.mode == "molt":
                feats = self.molt(states, aux)
            else:  # frozen: the head on the backbones' pooled features
                feats = {m: st["pooled"] for m, st in states.items()}
        # AVMoE balance (from the official AVMoE AVS code, not in the paper): balance_loss at each
        # router position, averaged over a stream's positions, summed over the streams
        for m, w in aux["router"].items():
            aux["balance"] = aux["balance"] + sum(balance_loss(w[:, p])
                                                  for p in range(w.shape[1])) / w.shape[1]
        x = torch.cat([feats[m] for m in self.mods], -1).reshape(B, S, -1)  # (B, S, sum D)
        return self.head(x), aux

    def avmoe(self, x, aux):
        """Sequential adaptation: in every block, r = MoE(X, X_other) read before each sub-layer,
        added after it.

        x: {m: backbone input (B*S, ...)} as self.inputs gives it; aux: the dict forward builds,
        {"router": {}, "alpha": {}, "orth": zeros(()), "balance": zeros(())}.
        -> {m: pooled features (B*S, D_m)}, the backbone's pool of its final LayerNorm
        (enc.pool(enc.norm(X))); and aux["router"][m] = the router weights (B*S, 2 L_m, E),
        positions in the order of router_positions (block 1 attn, block 1 mlp, block 2 attn...).
        The tokens start at enc.embed. The steps are paired_blocks(self.depth); at each step,
        for the attention and then for the MLP of the blocks it runs, every stream of the step
        computes its mixture from the streams as they were BEFORE this sub-layer (one snapshot
        for both: neither reads the other's update of this sub-layer), then
        X = X + sublayer(LN(X)) + gate * mixture, with sublayer(LN(X)) = Block.sublayer(name, X).
        Mixture and gate 2j of stream m wrap block j's attention, 2j + 1 its MLP. A stream that
        does not move on at a step is not updated; the other stream's mixture reads its current
        tokens."""
        x = {m: self.enc[m].embed(xm) for m, xm in x.items()}  # (B*S, prefix + N, D)
        weights = {m: [] for m in self.mods}
        for blocks in paired_blocks(self.depth):  # {m: j}: block j of stream m runs at this depth
            for pos, sub in enumerate(("attn", "mlp")):
                # the mixture and gate around this sub-layer
                k = {m: 2 * j + pos for m, j in blocks.items()}
                # both streams' mixtures read the other stream as it was before this sub-layer
                mixed = {m: self.moe[m][k[m]](x[m], x.get(self.other[m])) for m in blocks}
                for m, j in blocks.items():
                    r, w = mixed[m]
                    # AVMoE insertion: X = X + sublayer(LN(X)) + gate * MoE(X, X_other), gate
                    # initialised to 0
                    x[m] = (x[m] + self.enc[m].blocks[j].sublayer(sub, x[m]) +
                            self.gates[m][k[m]] * r)
                    weights[m].append(w)
        aux["router"] = {m: torch.stack(w, 1) for m, w in weights.items()}  # (B*S, 2 L_m, E)
        return {m: self.enc[m].pool(self.enc[m].norm(x[m])) for m in self.mods}

    def molt(self, states, aux):
        """Parallel adaptation: latent tokens per late layer, fused over layers, read out per
        segment."""
        out = {}
        for m in self.mods:
            h, h_o = states[m]["late"], states.get(self.other[m], {}).get("late")  # (B*S, K, N, D)
            mixed = [moe(h[:, k], None if h_o is None else h_o[:, k])
                     for k, moe in enumerate(self.tokens[m])]
            tokens = torch.stack([t for t, _ in mixed], 1)  # (B*S, K, n, D)
            aux["router"][m] = torch.stack([w for _, w in mixed], 1)  # (B*S, K, E)
            # MoLT fusion (reconstructed): layer weights alpha from the tokens, fused over K layers
            fused, aux["alpha"][m] = self.fusion[m](tokens)  # (B*S, n, D), (B*S, K)
            # MoLT orthogonality (reconstructed): one loss per modality, summed
            aux["orth"] = aux["orth"] + orthogonality_loss(tokens)
            # MoLT readout (reconstructed): feature = Linear(LN(mean_n F)), the fused tokens only
            out[m] = self.readout[m](fused.mean(1))  # (B*S, D)
        return out


def param_counts(model):
    """Trainable parameters of the adapters (everything trainable but the head), of the head, and
    all parameters."""
    head = sum(p.numel() for p in model.head.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"adapters": trainable - head, "head": head,
            "total": sum(p.numel() for p in model.parameters())}


# ----------------------------------------------------------------------------- checkpoint loading

HEAD_PREFIXES = ("head.", "head_dist.", "heads.", "mlp_head.", "classifier.")
OUR_BLOCK = ("norm1.", "attn.qkv.", "attn.proj.", "norm2.", "mlp.fc1.", "mlp.fc2.")
# Source name prefix -> ours, per layout: within a block (its prefix, matched by the pattern,
# becomes blocks.i.), and outside. HF's separate q, k, v become attn.q/k/v here and are concatenated
# into attn.qkv by _to_ours.
_BLOCK_RULES = {
    "timm": (r"blocks\.(\d+)\.", dict(zip(OUR_BLOCK, OUR_BLOCK))),
    "torchvision": (r"encoder\.layers\.encoder_layer_(\d+)\.", dict(zip(
        ("ln_1.", "self_attention.in_proj_", "self_attention.out_proj.", "ln_2.", "mlp.0.",
         "mlp.3."), OUR_BLOCK))),
    "hf": (r"(?:encoder\.)?layers?\.(\d+)\.", {
        "layernorm_before.": "norm1.", "attention.output.dense.": "attn.proj.",
        "layernorm_after.": "norm2.", "intermediate.dense.": "mlp.fc1.",
        "output.dense.": "mlp.fc2.",
        # attention.attention.query. -> attn.q., and so key -> k, value -> v
        **{f"attention.attention.{n}.": f"attn.{n[0]}." for n in ("query", "key", "value")},
        # transformers 5 in-memory names: attention.q_proj. -> attn.q., and so for k and v
        **{f"attention.{x}_proj.": f"attn.{x}." for x in "qkv"}, "attention.o_proj.": "attn.proj.",
        "mlp.fc1.": "mlp.fc1.", "mlp.fc2.": "mlp.fc2."}),
}
_TOP_RULES = {
    "timm": {"cls_token": "cls_token", "dist_token": "dist_token", "pos_embed": "pos_embed",
             "patch_embed.proj.": "patch_embed.", "norm.": "norm."},
    "torchvision": {"class_token": "cls_token", "encoder.pos_embedding": "pos_embed",
                    "conv_proj.": "patch_embed.", "encoder.ln.": "norm."},
    "hf": {"embeddings.cls_token": "cls_token", "embeddings.distillation_token": "dist_token",
           "layernorm.": "norm.", "embeddings.position_embeddings": "pos_embed",
           "embeddings.patch_embeddings.projection.": "patch_embed."}}
# Where a saved dict keeps the weights: timm's keys in its order (EMA first), then others'
_WRAPPERS = ("state_dict_ema", "state_dict", "model_state_dict", "model")
# Per backbone: its modality, train.py's flags for its file and its heads, its distillation token,
# the layouts read
BACKBONES = {"ViT": ("v", "vit_ckpt", "vit_heads", "no", "timm or torchvision ViT"),
             "AST": ("a", "ast_ckpt", "ast_heads", "a", "AST-repo or HF AST")}
_SAFETENSORS_DTYPES = dict(F64=torch.float64, F32=torch.float32, F16=torch.float16,
                           BF16=torch.bfloat16, I64=torch.int64, I32=torch.int32, I16=torch.int16,
                           I8=torch.int8, U8=torch.uint8, BOOL=torch.bool)


@contextlib.contextmanager
def _naming(src):
    """Yields how messages name a checkpoint: its path, or "the checkpoint" for one in memory. A
    ValueError raised inside becomes one line that starts with that name."""
    where = os.fspath(src) if isinstance(src, (str, os.PathLike)) else "the checkpoint"
    try:
        yield where
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def read_safetensors(path):
    """A .safetensors file: 8-byte little-endian header size, a JSON header (name -> dtype, shape,
    offsets), raw bytes. As the format requires, each tensor's bytes lie inside the data, do not
    overlap another's, and match its shape."""
    with open(path, "rb") as f:
        raw = f.read()
    n = int.from_bytes(raw[:8], "little") if len(raw) >= 8 else -1
    if not 0 < n <= len(raw) - 8:
        raise ValueError(f"header length {n} does not fit a file of {len(raw)} bytes: "
                         "not a .safetensors file")
    header, data = json.loads(raw[8:8 + n]), raw[8 + n:]
    state, end_of_last = {}, 0
    tensors = sorted(((k, v) for k, v in header.items() if k != "__metadata__"),
                     key=lambda kv: kv[1]["data_offsets"])
    for name, info in tensors:
        begin, end = info["data_offsets"]
        dtype = _SAFETENSORS_DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {name}: dtype {info['dtype']} is not supported here")
        empty = torch.empty(0, dtype=dtype)  # its element_size: dtype.itemsize needs torch 2.1
        if not end_of_last <= begin <= end <= len(data) or \
                end - begin != empty.element_size() * math.prod(info["shape"]):
            raise ValueError(f"tensor {name}: offsets {begin}..{end} are out of bounds, overlap "
                             f"another tensor or do not match {info['dtype']} x {info['shape']}")
        flat = torch.frombuffer(bytearray(data[begin:end]), dtype=dtype) if end > begin else empty
        state[name], end_of_last = flat.reshape(info["shape"]), end
    return state


def _read_checkpoint(src):
    """A path (torch.load(weights_only=True), which here also takes the args that timm's train.py
    saves, or read_safetensors) or an in-memory checkpoint -> (its tensors, unwrapped, without the
    prefix all their keys share, e.g. DataParallel's "module."; the dict they were found in; the
    top-level dict)."""
    top = src
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint not found: {path}")
        size = os.path.getsize(path)
        try:
            if size == 0:
                raise ValueError("the file is empty")
            allow = getattr(torch.serialization, "safe_globals", lambda _: contextlib.nullcontext())
            with allow([argparse.Namespace]):  # torch 2.5 and later
                top = read_safetensors(path) if path.endswith(".safetensors") else \
                    torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # a truncated, foreign or unsafe file: say why, in one line
            reason = str(e).split(". ")[0].splitlines()[0][:200] if str(e) else "no detail"
            if size and not path.endswith(".safetensors") and not zipfile.is_zipfile(path):
                reason = f"not a torch.save zip archive: {reason}"
            raise ValueError(f"unreadable ({type(e).__name__}: {reason}): save "
                             "model.state_dict() with torch.save or as .safetensors") from None
    if not isinstance(top, dict):
        raise ValueError(f"expected a state dict, got {type(top).__name__}: "
                         "save model.state_dict()")
    entries = top
    for key in _WRAPPERS:
        if isinstance(entries.get(key), dict):
            entries = entries[key]
    state = {k: v for k, v in entries.items() if torch.is_tensor(v)}
    cut = "".join(os.path.commonprefix(list(state)).rpartition(".")[:2])  # e.g. module., model.
    return {k[len(cut):]: v for k, v in state.items()}, entries, top


def _detect_layout(state, entries, ckpt, layouts):
    """The layout of a state dict and its backbone's key prefix, found by the patch embedding's
    weight (the source key that _TOP_RULES maps to ours)."""
    for layout, rules in _TOP_RULES.items():
        marker = next(src for src, dst in rules.items() if dst == "patch_embed.") + "weight"
        found = sorted(k[:-len(marker)] for k in state if k == marker or k.endswith("." + marker))
        if found:
            return layout, found[0]
    keys = [k if torch.is_tensor(v) else f"{k} ({type(v).__name__})"
            for k, v in entries.items()]
    raise ValueError(f"unknown checkpoint layout (keys: {', '.join(keys[:8])}"
                     f"{' ...' * (len(keys) > 8)}); {ckpt} takes {layouts} weights")


def _to_ours(state, layout, prefix, where):
    """Rename a source state dict to our key names; ignore classifier heads (with a note naming
    where they were found); reject anything else unknown."""
    out, heads, unknown = {}, [], []
    block_re, block_rules = _BLOCK_RULES[layout]
    for key, value in state.items():
        name = key.removeprefix(prefix)
        m = re.match(block_re, name)
        block, rest, rules = (f"blocks.{m[1]}.", name[m.end():], block_rules) if m else \
            ("", name, _TOP_RULES[layout])
        new = next((block + dst + rest[len(src):] for src, dst in rules.items()
                    if rest.startswith(src)), None)
        if name.startswith(HEAD_PREFIXES):
            heads.append(key)
        elif new is None:
            unknown.append(key)
        else:
            out[new] = value
    if unknown:
        raise ValueError(f"unexpected keys in a {layout} checkpoint: {unknown[:8]}"
                         f"{' ...' * (len(unknown) > 8)}")
    if heads:
        print(f"note: {where}: ignoring {len(heads)} classifier-head tensors ({heads[0]} ...)")
    for key in [k for k in out if ".attn.q." in k]:  # HF: separate q, k, v -> one fused qkv
        parts = [key.replace(".attn.q.", f".attn.{x}.") for x in "qkv"]
        if all(part in out for part in parts):
            out[key.replace(".attn.q.", ".attn.qkv.")] = torch.cat([out.pop(p) for p in parts])
    return out


def _load_into(model, state):
    """Copy tensors into the model; a missing, extra, mis-shaped or integer tensor is an error that
    names the key."""
    ours = model.state_dict()
    for key, value in ours.items():
        if key not in state:
            raise ValueError(f"missing tensor {key} (shape {tuple(value.shape)})")
        if state[key].shape != value.shape:
            raise ValueError(f"tensor {key}: checkpoint shape {tuple(state[key].shape)}, "
                             f"model expects {tuple(value.shape)}")
        if not state[key].is_floating_point():  # it would be cast to float without a word
            raise ValueError(f"tensor {key} holds {state[key].dtype}, not floating-point weights")
    extra = sorted(set(state) - set(ours))
    if extra:
        raise ValueError(f"unexpected tensors: {extra[:8]}")
    broken = [k for k, v in state.items() if not torch.isfinite(v.float()).all()]
    if broken:
        raise ValueError(f"tensors hold NaN or Inf ({broken[:4]}): the file is damaged or from a "
                         "run that diverged")
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval()


def _read_backbone(src, num_heads, what, where):
    """A ViT or AST checkpoint in our key names -> (state, layout, dims for the constructor, patch
    size). Its kind is checked before its heads, so that a wrong file is named as such; the heads
    come from the caller, else from the file (ours record them), else are guessed with a note."""
    state, entries, top = _read_checkpoint(src)
    _, ckpt, heads_flag, _, layouts = BACKBONES[what]
    ckpt, heads_flag = f"--{ckpt}", f"--{heads_flag}"
    if {"config", "history"} <= top.keys():
        raise ValueError(f"this is a train.py run checkpoint, not backbone weights: give {ckpt} "
                         "a backbone's own file")
    layout, prefix = _detect_layout(state, entries, ckpt, layouts)
    state = _to_ours(state, layout, prefix, where)
    for key in ["pos_embed", "patch_embed.weight", "blocks.0.mlp.fc1.weight"]:
        if key not in state:
            raise ValueError(f"missing tensor {key}")
    if ("dist_token" in state) != (what == "AST"):
        other = "AST" if what == "ViT" else "ViT"
        _, flag, _, token, _ = BACKBONES[other]
        raise ValueError(f"wrong kind of checkpoint: {other} weights (it has {token} distillation "
                         f"token): use load_{other.lower()} (--{flag})")
    dim, saved = state["pos_embed"].shape[-1], top.get("num_heads")
    if num_heads and saved and num_heads != saved:
        raise ValueError(f"{heads_flag}={num_heads}, but it was saved with {saved} heads")
    heads = num_heads or saved
    if not heads:  # the weights cannot tell
        if dim % 64:
            raise ValueError(f"width {dim} is not a multiple of 64, so its heads cannot be "
                             f"guessed: pass {heads_flag}")
        heads = dim // 64
        print(f"note: {where}: {heads} heads guessed (width {dim} // 64); if wrong, pass "
              f"{heads_flag}")
    dims = dict(dim=dim, depth=len({k.split(".")[1] for k in state if k.startswith("blocks.")}),
                heads=heads, mlp_dim=state["blocks.0.mlp.fc1.weight"].shape[0])
    return state, layout, dims, state["patch_embed.weight"].shape[-1]


def _resize_positions(state, prefix, rows, resize):
    """Both loaders: state["pos_embed"] (1, prefix + N, D) -> its N patches as a grid (1, D, rows,
    N / rows) through resize, back to tokens (1, prefix + N', D) after the prefix tokens, kept."""
    pos = state["pos_embed"].float()
    grid = resize(pos[:, prefix:].reshape(1, rows, -1, pos.shape[-1]).permute(0, 3, 1, 2))
    state["pos_embed"] = torch.cat([pos[:, :prefix], grid.flatten(2).transpose(1, 2)], 1)


def load_vit(src, image_size=None, num_heads=None):
    """timm or torchvision ViT weights (path or state dict) -> our ViT, at the checkpoint's image
    size unless image_size is given: then its position grid is resized as timm does, with a note.
    (So load_vit(path) tells a checkpoint's size: model.grid[0] * model.patch_embed.stride[0].)"""
    with _naming(src) as where:
        state, _, dims, patch = _read_backbone(src, num_heads, "ViT", where)
        old = math.isqrt(state["pos_embed"].shape[1] - 1)
        if old * old != state["pos_embed"].shape[1] - 1:
            raise ValueError(f"position embedding {tuple(state['pos_embed'].shape)} is not 1 + a "
                             "square grid")
        image_size = image_size or old * patch
        matches = f"--image_size={old * patch} matches the checkpoint"
        if image_size % patch:
            raise ValueError(f"--image_size={image_size} is not a multiple of the patch size "
                             f"{patch}: {matches}")
        new = image_size // patch
        if new != old:  # timm resample_abs_pos_embed: bicubic with antialias, prefix kept
            print(f"note: {where}: position grid {old}x{old} resized to {new}x{new} for "
                  f"--image_size={image_size}; {matches}")
            _resize_positions(state, 1, old, lambda grid: F.interpolate(
                grid, size=(new, new), mode="bicubic", align_corners=False, antialias=True))
        return _load_into(ViT(image_size, patch, eps=1e-6, **dims), state)


def load_ast(src, num_mel_bins=128, target_length=1024, fstride=10, tstride=10, num_heads=None):
    """AST-repo or HF AST weights -> our AST for inputs of (target_length, num_mel_bins)."""
    with _naming(src) as where:
        state, layout, dims, patch = _read_backbone(src, num_heads, "AST", where)
        model = AST(num_mel_bins, target_length, fstride, tstride,
                    eps=1e-12 if layout == "hf" else 1e-6, patch_size=patch, **dims)
        # the checkpoint's frequency patches are read with these flags: only its time axis can
        # differ from ours
        (f, new), n = model.grid, state["pos_embed"].shape[1] - 2
        if n % f:
            raise ValueError(f"its {n} position patches are not a multiple of {f} frequency "
                             f"patches: check --num_mel_bins={num_mel_bins} --fstride={fstride}")

        def crop_or_stretch(grid):  # AST repo: center-crop a shorter time axis, else bilinear
            old = grid.shape[3]
            if new < old:
                return grid.narrow(3, int(old / 2) - int(new / 2), new)
            return F.interpolate(grid, size=(f, new), mode="bilinear", align_corners=False) \
                if new > old else grid
        _resize_positions(state, 2, f, crop_or_stretch)
        return _load_into(model, state)


def timm_state_dict(model, prefix=""):
    """Our backbone as stage 0 saves it: {"state_dict": its weights in the timm layout (prefix
    "module.v." gives the AST-repo layout), "num_heads": what the weights cannot tell}, as timm's
    own files keep their weights under "state_dict". The loaders read both."""
    state = {prefix + k.replace("patch_embed.", "patch_embed.proj."): v.detach().clone()
             for k, v in model.state_dict().items()}
    return {"state_dict": state, "num_heads": model.blocks[0].attn.heads}
