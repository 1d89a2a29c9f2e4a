"""Function-preserving rotations. Convention: a rotation by an orthogonal M maps an activation x to x' = x M; the
consumer weight absorbs it as W' = W M (so x' W'^T = x W^T), a linear producer as W_p' = M^T W_p.

Offline (fused into weights): the residual stream (the stem, class token and position embedding, in_proj, out_proj,
the head; before a max pooling the head input is turned back online), the dt path
between x_proj's dt rows and dt_proj, the state dimension on the C side (x_proj's C rows).
Online (a `Rotate` op at a site, since no linear producer can absorb it): out_proj input, x_proj input, state h.
Mamba-2: the residual stream and the out_proj input as above; the state dimension is online on both sides
(`rotate_state_mamba2`), since C leaves the conv through a SiLU.
Attention: each value head offline in v_proj and o_proj (`rotate_heads`); for a quantized KV cache each query and
key head by one Hadamard (`rotate_queries_keys`), online after RoPE, offline in q_proj and k_proj without it.
"""

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from ..errors import InputError
from ..runtime import CenteredRMSNorm, MambaLM, NoNorm, RMSNorm, Site
from ..runtime.model import MLPHead
from .hadamard import factor, fast_hadamard, hadamard, hadamard_or_orthogonal


class Rotate(nn.Module):
    """x -> x M along the last dim (`matrix`: a rotation, or a tied head's input scale, see `fuse_norms`), or
    x -> x H^T with the fast Hadamard transform (`matrix` None). A last dim that is a multiple of `size` is rotated
    in blocks of `size` (Mamba-2's B and C: one block per group)."""

    per_token = True  # each token on its own (see `Site.per_token`)

    def __init__(self, size: int, matrix: torch.Tensor | None = None):
        super().__init__()
        self.size = size
        self.register_buffer("matrix", matrix)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = x.shape[-1]
        if width != self.size:
            x = x.unflatten(-1, (width // self.size, self.size))
        x = fast_hadamard(x) if self.matrix is None else x @ self.matrix.to(x.dtype)
        return x.flatten(-2) if width != self.size else x

    def as_matrix(self) -> torch.Tensor:
        return hadamard(self.size).T if self.matrix is None else self.matrix

    def extra_repr(self) -> str:
        return f"{self.size}, {'hadamard' if self.matrix is None else 'matrix'}"


def append_op(site: Site, op: nn.Module) -> None:
    """Add an op after the ones already at the site (transforms first, quantizers last)."""
    if site.op is None:
        site.op = op
    elif isinstance(site.op, nn.Sequential):
        site.op.append(op)
    else:
        site.op = nn.Sequential(site.op, op)


def random_hadamard(n: int, seed: int) -> torch.Tensor:
    """diag(random +-1) H: an orthogonal matrix with entries +-1/sqrt(n) (QuaRot's randomised Hadamard). Sizes with
    no Hadamard construction (a dt_rank of 3, say) get a seeded random orthogonal matrix instead."""
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).float() * 2 - 1
    return signs[:, None] * hadamard_or_orthogonal(n, seed)


def head_of(model: nn.Module) -> nn.Linear:
    """The linear layer that reads the head input (an MLP head's first)."""
    head = model.lm_head if isinstance(model, MambaLM) else model.head
    return head.fc1 if isinstance(head, MLPHead) else head


def branches(mixer: nn.Module) -> list[nn.Module]:
    return [mixer.ssm] + ([mixer.ssm_b] if mixer.ssm_b is not None else [])


def is_tied(model: nn.Module) -> bool:
    return isinstance(model, MambaLM) and model.config.tie_embeddings


def max_pooled(model: nn.Module) -> bool:
    """A max over tokens commutes with no rotation and no sign change: the head input is kept unrotated."""
    return getattr(model.config, "pooling", None) == "max"


def stream_writers(model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """What writes the residual stream before the first block: tensors with d_model as their first dimension
    (producer weights: the patch conv's, an input linear's) and as their last (embedding rows, producer biases,
    the class token, the position embedding)."""
    first, last = [], []
    if hasattr(model, "embedding"):
        last.append(model.embedding.weight)
    producers = [model.patch_embed.proj] if hasattr(model, "patch_embed") else []
    producers += [model.input_proj] if hasattr(model, "input_proj") else []
    for producer in producers:
        first.append(producer.weight)
        if producer.bias is not None:
            last.append(producer.bias)
    last += [getattr(model, name) for name in ("cls_token", "pos_embed") if hasattr(model, name)]
    return first, last


@torch.no_grad()
def untie_head(model: nn.Module) -> None:
    if is_tied(model):
        model.lm_head.weight = nn.Parameter(model.embedding.weight.detach().clone())
        model.config.tie_embeddings = False


@torch.no_grad()
def fuse_norm_into(norm: nn.Module, readers: list[nn.Module], scale: bool = True) -> None:
    """norm(x) = n(x) * g (+ b)  ->  the norm keeps n(x) only; every layer reading it absorbs g in its weight's
    columns (and b into its bias). With `scale` False only b moves (the caller keeps g elsewhere)."""
    bias = getattr(norm, "bias", None)
    for reader in readers:
        weight = reader.weight.detach().clone()
        if bias is not None:
            if not hasattr(reader, "bias"):
                raise InputError(f"cannot fold a norm's bias into a {type(reader).__name__}, which has none")
            shift = weight @ bias
            if reader.bias is None:
                reader.bias = nn.Parameter(shift)
            else:
                reader.bias += shift
        if scale:
            reader.weight.copy_(weight * norm.weight)
    if bias is not None:
        bias.zero_()
    if scale:
        norm.weight.fill_(1.0)


def each_block(model: nn.Module) -> Callable[[Callable[[nn.Module], None]], None]:
    """Apply an edit to every block of an in-memory model, now. A model-wide transform applies its per-block part
    through such a callable, so that a streamed walk (methods/blocks.py) can apply it to each block as it reads it."""
    def edit(block_edit: Callable[[nn.Module], None]) -> None:
        for layer in model.layers:
            block_edit(layer)
    return edit


@torch.no_grad()
def center_block_output(layer: nn.Module) -> None:
    for writer in layer.output_layers():
        writer.weight -= writer.weight.mean(0, keepdim=True)
        if writer.bias is not None:
            writer.bias -= writer.bias.mean()


@torch.no_grad()
def center_residual(model: nn.Module, edit_blocks=None) -> None:
    """Make every write to the residual stream zero-mean over its channels. Every reader of the stream is a
    LayerNorm, which ignores the mean, so the function is unchanged; afterwards LayerNorm = RMSNorm (SliceGPT)."""
    untie_head(model)
    first, last = stream_writers(model)
    for tensor in first:
        tensor -= tensor.mean(0, keepdim=True)
    for tensor in last:
        tensor -= tensor.mean(-1, keepdim=True)
    (edit_blocks or each_block(model))(center_block_output)


@torch.no_grad()
def fuse_block_norm(layer: nn.Module) -> None:
    """The block's norms folded into the layers reading them (`norm_readers`); a LayerNorm (of a centred model)
    becomes a scale-free RMSNorm."""
    for norm, readers, _ in layer.norm_readers():
        if not isinstance(norm, NoNorm):
            fuse_norm_into(norm, readers)
    if isinstance(layer.norm, nn.LayerNorm):
        layer.norm = RMSNorm(layer.norm.normalized_shape[0], layer.norm.eps)


@torch.no_grad()
def fuse_norms(model: nn.Module, edit_blocks=None, untie: bool = False) -> nn.Module:
    """Fold every block norm into in_proj and the final norm into the head. A tied LM head is the embedding, so
    there the final norm's scale g becomes an online x -> x diag(g) at the head input instead (a D x D product,
    ~1/vocab of the head's cost): the checkpoint keeps one matrix for both; so it does before a max pooling, which
    a negative g would not pass. With `untie` a tied head gets its own matrix instead (an engine runs no online
    product). LayerNorm models are first centred (`center_residual`), and their norms become scale-free RMSNorms.
    A final LayerNorm over blocks of another kind (or none) reads a stream that cannot be centred offline (the
    blocks read the mean too): its scale and bias are folded like any other, and it becomes a scale-free
    `CenteredRMSNorm` (final norm "centered"), which keeps its centring through a rotation of the stream. Absent
    norms (norm "none") have nothing to fold. `edit_blocks` applies the per-block part (default: `each_block`)."""
    edit_blocks = edit_blocks or each_block(model)
    if untie:
        untie_head(model)
    final_layer_norm = isinstance(model.norm_f, nn.LayerNorm)
    layer_norm = final_layer_norm and getattr(model.config, "norm", "rms") == "layer"  # every reader a LayerNorm
    if layer_norm:
        center_residual(model, edit_blocks)
    edit_blocks(fuse_block_norm)
    if isinstance(model.norm_f, NoNorm):
        pass
    elif is_tied(model) or max_pooled(model):
        fuse_norm_into(model.norm_f, [head_of(model)], scale=False)
        append_op(model.sites["norm_f"], Rotate(model.config.d_model, torch.diag(model.norm_f.weight.clone())))
        model.norm_f.weight.fill_(1.0)
    else:
        fuse_norm_into(model.norm_f, [head_of(model)])
    if layer_norm:
        model.norm_f = RMSNorm(model.norm_f.normalized_shape[0], model.norm_f.eps)
        model.config.norm = "rms"
        if getattr(model.config, "final_norm", "same") == "layer":
            model.config.final_norm = "rms"
    elif final_layer_norm:
        model.norm_f = CenteredRMSNorm(model.norm_f.normalized_shape[0], model.norm_f.eps)
        model.config.final_norm = "centered"
    return model


def check_unit_norm(norm: nn.Module) -> None:
    if not (isinstance(norm, NoNorm) or isinstance(norm, (RMSNorm, CenteredRMSNorm)) and torch.all(norm.weight == 1)):
        raise InputError("rotating the residual stream needs RMSNorm blocks with fused (unit) scales")


@torch.no_grad()
def rotate_block_residual(layer: nn.Module, M: torch.Tensor) -> None:
    """The block's readers of the residual stream absorb M in their columns (Zamba2's [stream, embedding] readers
    M on each half), its writers M^T in their rows."""
    for norm, _, _ in layer.norm_readers():
        check_unit_norm(norm)
    for reader in layer.input_layers():
        reader.weight.copy_(reader.weight @ M)
    if layer.reads_embedding:
        joined = torch.block_diag(M, M)
        for reader in layer.joined_input_layers():
            reader.weight.copy_(reader.weight @ joined)
    for writer in layer.output_layers():
        writer.weight.copy_(M.T @ writer.weight)
        if writer.bias is not None:
            writer.bias.copy_(writer.bias @ M)


@torch.no_grad()
def rotate_residual(model: nn.Module, M: torch.Tensor, edit_blocks=None) -> nn.Module:
    """Rotate the residual stream by M (D x D orthogonal). Needs RMSNorms with unit scale, or no norms (run
    `fuse_norms` first): an RMSNorm without scale commutes with any rotation, a LayerNorm does not. Before a max
    pooling the head input is turned back (x M -> x) online, and the head keeps its weights. `edit_blocks` applies
    the per-block part (default: `each_block`)."""
    check_unit_norm(model.norm_f)
    head_input = model.sites["norm_f"].op
    if head_input is not None and (not isinstance(head_input, Rotate) or head_input.matrix is None):
        raise InputError("rotate the residual stream before other ops are added at the head input")
    if isinstance(model.norm_f, CenteredRMSNorm):  # its centring direction turns with the stream
        model.norm_f.direction.copy_(model.norm_f.direction @ M)
    (edit_blocks or each_block(model))(partial(rotate_block_residual, M=M))
    first, last = stream_writers(model)
    for tensor in first:
        tensor.copy_((M.T @ tensor.flatten(1)).view_as(tensor))
    for tensor in last:  # a tied head turns with the embedding
        tensor.copy_(tensor @ M)
    if max_pooled(model):  # the head-input product G (see fuse_norms), or none, becomes M^T G
        if head_input is None:
            append_op(model.sites["norm_f"], Rotate(len(M), M.T.clone()))
        else:
            head_input.matrix = M.T @ head_input.matrix
    elif not is_tied(model):
        head_of(model).weight.copy_(head_of(model).weight @ M)
    elif head_input is not None:  # the head-input product G (see fuse_norms) becomes M^T G M
        head_input.matrix = M.T @ head_input.matrix @ M
    return model


@torch.no_grad()
def rotate_dt_path(ssm: nn.Module, M: torch.Tensor) -> None:
    """dt_low' = dt_low M: x_proj's dt rows absorb M^T, dt_proj absorbs M. Behind FalconMamba's weight-less norm
    the rotation is online at the dt_low site, after any smoothing there (the norm itself commutes with M)."""
    R = ssm.dt_rank
    if ssm.inner_norm_eps:
        append_op(ssm.sites["dt_low"], Rotate(R, M.clone()))
        ssm.dt_proj.weight.copy_(ssm.dt_proj.weight @ M)
        return
    ssm.x_proj.weight[:R] = M.T @ ssm.x_proj.weight[:R]
    if ssm.x_proj.bias is not None:
        ssm.x_proj.bias[:R] = ssm.x_proj.bias[:R] @ M
    ssm.dt_proj.weight.copy_(ssm.dt_proj.weight @ M)


@torch.no_grad()
def rotate_state(ssm: nn.Module, M: torch.Tensor) -> None:
    """h*C over the state dimension N: C' = C M offline (x_proj's C rows), h' = h M online at site h. Behind
    FalconMamba's weight-less norm C is rotated online too, after any smoothing at its site."""
    R, N = ssm.dt_rank, ssm.d_state
    if ssm.inner_norm_eps:
        append_op(ssm.sites["C"], Rotate(N, M.clone()))
        append_op(ssm.sites["h"], Rotate(N, M.clone()))
        return
    rows = slice(R + N, R + 2 * N)
    ssm.x_proj.weight[rows] = M.T @ ssm.x_proj.weight[rows]
    if ssm.x_proj.bias is not None:
        ssm.x_proj.bias[rows] = ssm.x_proj.bias[rows] @ M
    append_op(ssm.sites["h"], Rotate(N, M.clone()))


def rotate_state_mamba2(mixer: nn.Module, M: torch.Tensor) -> None:
    """C.h over the state dimension N, both online: C' = C M in each group's block, h' = h M."""
    append_op(mixer.sites["C"], Rotate(len(M), M.clone()))
    append_op(mixer.sites["h"], Rotate(len(M), M.clone()))


@torch.no_grad()
def rotate_linear_input(site: Site, linear: nn.Linear, rotate: Rotate) -> None:
    """Online rotation of a linear layer's input at `site`; the linear absorbs it offline."""
    linear.weight.copy_(linear.weight @ rotate.as_matrix())
    append_op(site, rotate)


def rotate_out_proj_input(mixer: nn.Module) -> None:
    """The online Hadamard at out_proj's input (R2), absorbed by out_proj: the same in both block kinds."""
    rotate_linear_input(mixer.sites["out_proj_in"], mixer.out_proj, Rotate(mixer.out_proj.in_features))


def online_hadamard(size: int, seed: int) -> Rotate:
    """The fast Hadamard transform of `size`, or where no Hadamard of that order is built, a seeded orthogonal
    matrix (a size x size product per token)."""
    try:
        factor(size)
    except InputError:
        return Rotate(size, hadamard_or_orthogonal(size, seed))
    return Rotate(size)


def rotate_down_input(mlp: nn.Module, seed: int) -> None:
    """An online Hadamard at an MLP's down_proj input, absorbed by down_proj (QuaRot's R4)."""
    rotate_linear_input(mlp.sites["down_in"], mlp.down_proj, online_hadamard(mlp.down_proj.in_features, seed))


@torch.no_grad()
def rotate_heads(attention: nn.Module, M: torch.Tensor) -> None:
    """Each value head's channels turned by M (head_dim x head_dim), offline: v_proj's rows absorb M^T; the
    attention mixes positions, not channels, so each query head's output turns by the same M, which o_proj's
    columns absorb (QuaRot's per-head R2 at the o_proj input, without an online product). A value adapter's rows
    turn with v_proj's."""
    c = attention.config
    blocks = torch.block_diag(*[M] * c.n_kv_heads)
    for writer in attention.value_layers():
        writer.weight.copy_(blocks.T @ writer.weight)
        if writer.bias is not None:
            writer.bias.copy_(writer.bias @ blocks)
    attention.o_proj.weight.copy_(attention.o_proj.weight @ torch.block_diag(*[M] * c.n_heads))


@torch.no_grad()
def rotate_queries_keys(attention: nn.Module, seed: int) -> None:
    """One orthogonal H on the channels of every query and every key head (with grouped queries, the same for
    both), so that q k^T is unchanged and the KV cache holds keys whose outlier channels H has spread over the head
    (QuaRot's Hadamard on q and k). RoPE turns pairs of channels by the position's angles, which H does not commute
    with: after RoPE H is online, the fast Hadamard at the `q` and `k` sites (a seeded orthogonal matrix for a
    head_dim with no Hadamard construction); without RoPE a randomised Hadamard fuses offline into the rows of
    q_proj and k_proj (and of their adapters)."""
    c = attention.config
    if c.rope:
        for kind in ("q", "k"):
            append_op(attention.sites[kind], online_hadamard(c.head_dim, seed))
        return
    M = random_hadamard(c.head_dim, seed)
    for heads, writers in ((c.n_heads, attention.query_layers()), (c.n_kv_heads, attention.key_layers())):
        blocks = torch.block_diag(*[M] * heads)
        for linear in writers:
            linear.weight.copy_(blocks.T @ linear.weight)
            if linear.bias is not None:
                linear.bias.copy_(linear.bias @ blocks)
