"""The trainable parts: AVMoE's experts (CMA, UA) and noisy router; MoLT's layer-wise token experts,
token fusion and orthogonality loss.

Notation follows the papers: X_a (B, N_a, D_a) audio tokens, X_v (B, N_v, D_v) visual tokens, L
latent tokens. MoLT's full text is not available to us: its part below is our reconstruction from
the paper's abstract.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def f_c(q, k, v):
    """Attention-based token compression. We scale by 1/sqrt(D) (LAVisH's latent-token adapter omits
    it).

    q (B, N_q, D), k (B, N_k, D), v (B, N_k, D) -> (B, N_q, D): the queries plus the attention
    read-out, the softmax over the N_k keys of each query, D = q's last size. One head, no
    projections, no mask."""
    # AVMoE CMA-1: f_c(Q, K, V) = Q + softmax(Q K^T / sqrt(D)) V
    attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)  # (B, N_q, N_k)
    return q + attn @ v  # (B, N_q, D)


class Bottleneck(nn.Module):
    """Z = up(sigma(down(LN(X)))), width D / reduction. (AVMoE's code uses grouped 1x1 convs +
    BatchNorm here.) The paper's bottleneck is Z = up(sigma(down(X))): the LayerNorm in front is
    ours."""

    def __init__(self, dim, reduction):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.down = nn.Linear(dim, max(1, dim // reduction))
        self.up = nn.Linear(max(1, dim // reduction), dim)

    def forward(self, x):
        # AVMoE CMA-3: Z = theta_up(sigma(theta_down(LN(X)))), sigma = exact GELU; the LN is ours
        # (the paper: Z = theta_up(sigma(theta_down(X))))
        return self.up(F.gelu(self.down(self.norm(x))))


def latents(n, dim):
    return nn.Parameter(torch.randn(1, n, dim) / math.sqrt(dim))


def project(dim_in, dim_out):
    """Maps the other modality's tokens to this stream's width when D_a != D_v."""
    return nn.Identity() if dim_in == dim_out else nn.Linear(dim_in, dim_out)


# -------------------------------------------------------------- AVMoE (sequential, in every layer)


class CMA(nn.Module):
    """Cross-modal adapter for stream m: compress the other modality o into latent tokens, let X_m
    attend to them."""

    def __init__(self, dim, dim_other, n_latents, reduction):
        super().__init__()
        self.proj = project(dim_other, dim)
        self.latents = latents(n_latents, dim)
        self.bottleneck = Bottleneck(dim, reduction)

    def forward(self, x, other):
        """x = X_m (B, N_m, D_m), other = X_o (B, N_o, D_o) -> Z (B, N_m, D_m), one per token.

        X_o goes through self.proj first (the identity when D_o = D_m). The latents (1, n, D_m) are
        shared by the batch. Return the bottleneck's output Z alone: no `x +` here, since the
        insertion adds Z to the stream itself (AVMoE insertion in model.py)."""
        other = self.proj(other)  # (B, N_o, D_m)
        # AVMoE CMA-1: S_o = f_c(L_o, X_o, X_o), the latents L_o compress the other modality
        s = f_c(self.latents.expand(len(x), -1, -1), other, other)  # (B, n, D_m)
        # AVMoE CMA-2: X_mo = f_c(X_m, S_o, S_o), each token of X_m attends to the n latents S_o
        fused = f_c(x, s, s)
        return self.bottleneck(fused)  # AVMoE CMA-3: Z = bottleneck(X_mo), returned alone


class UA(nn.Module):
    """Unimodal adapter: the same path within one modality. The AVMoE text we worked from prints UA
    with S_v (which would make it cross-modal); AVMoE describes UA as intra-modal, so we use the
    modality's own summary S_m."""

    def __init__(self, dim, n_latents, reduction):
        super().__init__()
        self.latents = latents(n_latents, dim)
        self.bottleneck = Bottleneck(dim, reduction)

    def forward(self, x, other=None):
        # AVMoE UA: S_m = f_c(L'_m, X_m, X_m); X_mm = f_c(X_m, S_m, S_m); Z = bottleneck(X_mm)
        s = f_c(self.latents.expand(len(x), -1, -1), x, x)  # (B, n, D_m)
        return self.bottleneck(f_c(x, s, s))


class NoisyRouter(nn.Module):
    """Weights the experts of one stream from i = [mean X_self; mean X_other]. Concatenating the two
    means and applying the MLP's first Linear is the same family as projecting X_other first (mean
    and Linear commute)."""

    def __init__(self, in_dim, n_experts, sigma, hidden=64):
        super().__init__()
        self.sigma = sigma
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_experts))
        nn.init.zeros_(self.mlp[2].weight)  # uniform weights at the start
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, context, expert_outputs):
        """context i (B, in_dim), E expert outputs (B, ...) -> (sum_e w_e Z_e, w (B, E))."""
        # AVMoE router: g = r(i_t), i_t = [mean X_self; mean X_other]
        g = self.mlp(context)  # (B, E)
        if self.training and self.sigma > 0:
            # AVMoE router noise: g' = g + eps, eps ~ N(0, sigma^2), training only
            g = g + self.sigma * torch.randn_like(g)
        # AVMoE router: w_e = exp(g'_e) / sum_k exp(g'_k); output = sum_e w_e Z_e
        w = torch.softmax(g, dim=-1)  # (B, E)
        # (B, ...) from (B, E, ...)
        out = torch.einsum("be,be...->b...", w, torch.stack(expert_outputs, 1))
        return out, w


def balance_loss(weights):
    """Load balance: KL(uniform || mean routing weights over the batch) = -log E - mean_e log(mean_b
    w_be)."""
    # AVMoE balance (from the official AVMoE AVS code, not in the paper):
    # L_bal = KL(u || mean_b w_b) = -log E - mean_e log(mean_b w_be), u uniform over the E experts
    mean = weights.mean(0)  # (E,)
    return -math.log(len(mean)) - mean.clamp_min(1e-9).log().mean()


# -------------------------------------------------------------- MoLT (parallel, late layers only)


class TokenUA(nn.Module):
    """MoLT unimodal expert: latent queries read one layer's hidden states of their own modality.
    (MoLT's equations are our reconstruction from its abstract: the tags say "reconstructed".)"""

    def __init__(self, dim, n_latents, reduction):
        super().__init__()
        self.latents = latents(n_latents, dim)
        self.bottleneck = Bottleneck(dim, reduction)

    def forward(self, h, other=None):
        # MoLT tokens (UA) (reconstructed): T = f_c(Q_m^l, H_m^l, H_m^l); T + bottleneck(T)
        t = f_c(self.latents.expand(len(h), -1, -1), h, h)  # (B, n, D_m)
        return t + self.bottleneck(t)


class TokenCMA(nn.Module):
    """MoLT cross-modal expert: latent queries summarise their own modality, then read the other
    one.

    The opposite direction to AVMoE's CMA, where the latents compress the OTHER modality and X_m
    attends to them (one output per token of X_m, a residual for the stream). A MoLT expert must
    output n tokens, not a per-token residual, so the queries of both steps must be the latents:
    they first summarise H_m, then that summary reads H_o."""

    def __init__(self, dim, dim_other, n_latents, reduction):
        super().__init__()
        self.proj = project(dim_other, dim)
        self.latents = latents(n_latents, dim)
        self.bottleneck = Bottleneck(dim, reduction)

    def forward(self, h, other):
        other = self.proj(other)  # (B, N_o, D_m)
        # MoLT tokens (CMA) (reconstructed): S = f_c(Q_m^l, H_m^l, H_m^l); T = f_c(S, H_o^l, H_o^l);
        # T + bottleneck(T)
        s = f_c(self.latents.expand(len(h), -1, -1), h, h)  # (B, n, D_m)
        t = f_c(s, other, other)  # (B, n, D_m)
        return t + self.bottleneck(t)


# -------------------------------------------------------------- one mixture, both methods


class MoE(nn.Module):
    """One stream's mixture: n_cma cross-modal + n_ua unimodal experts (only UA without the other
    modality) and a noisy router; AVMoE's CMA/UA return a residual per token, MoLT's
    TokenCMA/TokenUA n latent tokens."""

    def __init__(self, dim, dim_other, cfg, tokens=False):
        super().__init__()
        cma, ua = (TokenCMA, TokenUA) if tokens else (CMA, UA)
        n_cma = cfg.n_cma if dim_other else 0
        self.experts = nn.ModuleList([cma(dim, dim_other, cfg.latent_tokens, cfg.reduction)
                                      for _ in range(n_cma)] +
                                     [ua(dim, cfg.latent_tokens, cfg.reduction)
                                      for _ in range(cfg.n_ua)])
        self.router = NoisyRouter(dim + (dim_other or 0), len(self.experts), cfg.router_sigma)

    def forward(self, x, other):
        """-> mixed expert output and the router weights (B, E), CMA experts first."""
        # AVMoE router input: i = [mean X_self; mean X_other] per sample (only the own mean for one
        # modality)
        # (B, D_m + D_o)
        ctx = x.mean(1) if other is None else torch.cat([x.mean(1), other.mean(1)], -1)
        return self.router(ctx, [e(x, other) for e in self.experts])


# -------------------------------------------------------------- MoLT fusion and regularizer


class TokenFusion(nn.Module):
    """Fuses the layer-wise tokens of one modality by their relative significance."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.score = nn.Linear(dim, 1, bias=False)

    def forward(self, tokens):
        """tokens (B, K, n, D), one set per late layer -> fused (B, n, D) and layer weights alpha
        (B, K).

        Per clip b and layer l: the mean of its n tokens (D,), then self.norm (the LayerNorm), then
        self.score (w, no bias) gives the score s_l; alpha is the softmax of the scores over the K
        layers (each row of alpha sums to 1); the fused tokens are the alpha-weighted sum of the K
        layers' token sets, token by token."""
        # MoLT fusion (reconstructed): s_l = w . LN(mean_n T^l); alpha = softmax_l(s);
        # F = sum_l alpha_l T^l
        s = self.score(self.norm(tokens.mean(2))).squeeze(-1)  # (B, K)
        alpha = torch.softmax(s, dim=-1)
        return torch.einsum("bk,bknd->bnd", alpha, tokens), alpha  # (B, n, D)


def orthogonality_loss(tokens):
    """tokens (B, K, n, D): mean squared off-diagonal cosine similarity between all K * n layer-wise
    tokens.

    -> a scalar tensor: per clip, the squared cosine of every ordered pair (i, j), i != j, of its
    K * n tokens (pairs within a layer and across layers alike), averaged over the pairs and then
    over the B clips. Cosines, so a token's length does not matter. With one token (K * n = 1)
    there is no pair: the loss is 0, not NaN."""
    # MoLT orthogonality (reconstructed): G = T_hat T_hat^T over normalised tokens;
    # L_orth = mean_{i != j} G_ij^2
    t = F.normalize(tokens.flatten(1, 2), dim=-1)  # (B, K*n, D)
    g = t @ t.transpose(1, 2)  # (B, K*n, K*n)
    m = g.shape[-1]
    if m < 2:  # one token (one layer, one latent) has no other to be apart from
        return g.new_zeros(())
    off = ~torch.eye(m, dtype=torch.bool, device=g.device)
    return g[:, off].pow(2).mean()
