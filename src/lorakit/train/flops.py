"""Useful FLOPs of a LoRA training step, counted once from the examples, and the GEMM shapes they run at.

Model FLOPs utilisation (MFU) divides the useful work of a step by the time the step took and by
the machine's matmul peak. Useful work is what the task needs, whatever an implementation does:

    frozen matmul weights (every linear layer but the output head)   4 N n    forward 2N, input gradient 2N
    trained matmul weights (LoRA's A and B)                          6 N n    + the weight gradient 2N
    attention: scores Q K^T and values P V over the causal pairs      12 L w n(n+1)/2
               of each example's own real tokens                      (forward 2 x 2 w per pair, backward twice that)
    output head, only at the labelled positions                       4 V h l  forward and input gradient
    embedding lookup                                                  0

with n an example's real tokens, l its labelled tokens, L layers and w the queries' width (heads x
head_dim). Pad tokens, logits nobody needs, attention across packed examples and recomputation
(gradient checkpointing) are a variant's own cost, not useful work. The first layer's input
gradient into the frozen embedding is counted although nothing needs it (~0.3% of the total for
SmolLM2-135M).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lorakit.lora.fused_siblings import SIBLINGS


@dataclass(frozen=True)
class StepFlops:
    """What the count needs to know about a model (see the module docstring for the formula)."""

    frozen_matmul_params: int  # linear weights outside the output head and the embeddings, frozen
    trained_matmul_params: int  # trainable matrices (LoRA's A and B, trained linear weights)
    layers: int
    attention_width: int  # query heads x head_dim
    head_params: int  # vocab x hidden of the output head (0 for a model without one)

    @classmethod
    def of(cls, model: nn.Module) -> StepFlops:
        """Count the parameters of `model` (with its adapters injected) by kind."""
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        head_ids = {id(p) for p in head.parameters()} if head is not None else set()
        frozen = sum(
            m.weight.numel() for m in model.modules()
            if isinstance(m, nn.Linear) and m is not head and not m.weight.requires_grad
            and id(m.weight) not in head_ids
        )
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad and p.dim() == 2 and id(p) not in head_ids)
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        return cls(frozen, trained, config.num_hidden_layers, heads * head_dim, head.weight.numel() if head is not None else 0)

    def example(self, real_tokens: int, labelled_tokens: int) -> float:
        """Useful FLOPs of one example's forward and backward."""
        n = real_tokens
        matmuls = (4 * self.frozen_matmul_params + 6 * self.trained_matmul_params) * n
        attention = 12 * self.layers * self.attention_width * n * (n + 1) // 2
        return float(matmuls + attention + 4 * self.head_params * labelled_tokens)

    def examples(self, examples: list[dict]) -> float:
        """Useful FLOPs of training once on tokenised examples (input_ids, labels with -100 unlabelled).

        A causal LM's label at position i is predicted from position i-1, so the labelled positions
        whose logits the loss needs are the labels other than -100 after the first token.
        """
        total = 0.0
        for e in examples:
            labelled = sum(1 for label in e["labels"][1:] if label != -100)
            total += self.example(len(e["input_ids"]), labelled)
        return total


def gemm_shapes(model: nn.Module, tokens: int, labelled: int) -> list[tuple[int, int, int]]:
    """The (M, K, N) products of a training step's frozen linear layers for `tokens` rows.

    Each frozen (out, in) weight runs x @ W^T (tokens, in) x (in, out) forward and dy @ W
    (tokens, out) x (out, in) for the input gradient; the head runs at `labelled` rows. Sibling
    projections (q/k/v, gate/up) also at their packed width, as train.fuse_projections runs them.
    Distinct shapes only, in the order met.
    """
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    shapes: dict[tuple[int, int, int], None] = {}
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head:
            out_features, in_features = module.weight.shape
            shapes[(tokens, in_features, out_features)] = None
            shapes[(tokens, out_features, in_features)] = None
    for module in model.modules():  # packed siblings (lora/fused_siblings.py) run as one wider product
        for names in SIBLINGS:
            bases = [getattr(getattr(module, name, None), "base_layer", getattr(module, name, None)) for name in names]
            if all(isinstance(b, nn.Linear) for b in bases) and len({b.in_features for b in bases}) == 1:
                out_features = sum(b.out_features for b in bases)
                shapes[(tokens, bases[0].in_features, out_features)] = None
                shapes[(tokens, out_features, bases[0].in_features)] = None
    if head is not None:
        vocab, hidden = head.weight.shape
        shapes[(labelled, hidden, vocab)] = None
        shapes[(labelled, vocab, hidden)] = None
    return list(shapes)


def gemm_work(model, tokens: int, labelled: int) -> list[list[int]]:
    """[M, K, N, count]: the frozen-weight and head products of one mean step, as lorakit runs them.

    Each frozen linear layer runs forward (M=tokens, K=in, N=out) and its input gradient (K=out,
    N=in); q/k/v and gate/up at their packed width (train.fuse_projections); the head at the
    labelled rows only. Timed at the measured rates, they bound what any implementation reaches.
    """
    head = model.get_output_embeddings()
    work: dict[tuple[int, int, int], int] = {}

    def add(m, k, n):
        for shape in ((m, k, n), (m, n, k)):
            work[shape] = work.get(shape, 0) + 1

    packed = set()
    for module in model.modules():
        for names in SIBLINGS:
            bases = [getattr(getattr(module, name, None), "base_layer", None) for name in names]
            if all(isinstance(b, nn.Linear) for b in bases):
                add(tokens, bases[0].in_features, sum(b.out_features for b in bases))
                packed.update(id(b) for b in bases)
    for module in model.modules():
        if isinstance(module, nn.Linear) and module is not head and id(module) not in packed \
                and not module.weight.requires_grad:
            add(tokens, module.in_features, module.out_features)
    vocab, hidden = head.weight.shape
    add(labelled, hidden, vocab)
    return [[*shape, count] for shape, count in work.items()]
