"""The LM head and next-token cross-entropy fused into one autograd node.

Why: on CPU the unfused path (logits → slice for the shift → log_softmax → NLL) makes four passes
over the (tokens × vocab) logits forward and as many backward, plus a zero-filled gradient for the
slice; at the tiny preset that is half the step. Here the forward makes one logsumexp pass and the
backward one softmax pass, row chunk by row chunk so that no (tokens × vocab) temporary is
allocated beyond the logits themselves.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _row_chunks(n_rows: int, vocab: int, device: torch.device) -> list[tuple[int, int]]:
    """Row ranges whose (rows × vocab) fp32 block is ~4 MiB on a CPU: it stays in cache and the allocator reuses
    it. On a GPU, where each chunk costs a handful of kernel launches and cache does not come into it, ~256 MiB."""
    budget = 1 << 20 if device.type == "cpu" else 1 << 26  # elements
    rows = max(16, budget // max(vocab, 1))
    return [(i, min(i + rows, n_rows)) for i in range(0, n_rows, rows)]


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels):
        # hidden (N, H), weight (V, H), labels (N,) with -100 = ignore
        ctx.set_materialize_grads(False)
        N, V = hidden.shape[0], weight.shape[0]
        logits = F.linear(hidden, weight)  # one GEMM: faster than row chunks of it
        acc = torch.promote_types(logits.dtype, torch.float32)  # the softmax runs in fp32 at least
        lse = torch.empty(N, dtype=acc, device=hidden.device)
        for a, b in _row_chunks(N, V, hidden.device):
            lse[a:b] = torch.logsumexp(logits[a:b].to(acc), dim=-1)
        valid = labels != -100
        count = valid.sum().clamp(min=1)
        safe = labels.masked_fill(~valid, 0)
        target = logits.gather(1, safe[:, None]).squeeze(1).to(acc)
        loss = ((lse - target) * valid).sum() / count
        ctx.save_for_backward(hidden, weight, logits, lse, safe, valid, count)
        return loss, logits

    @staticmethod
    def backward(ctx, grad_loss, grad_logits):
        hidden, weight, logits, lse, safe, valid, count = ctx.saved_tensors
        if grad_loss is None and grad_logits is None:
            return None, None, None
        need_h, need_w = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_h else None
        grad_weight = torch.zeros_like(weight) if need_w else None
        scale = valid.to(lse.dtype) * (grad_loss / count) if grad_loss is not None else None
        chunks = _row_chunks(hidden.shape[0], weight.shape[0], hidden.device)
        buf = logits.new_empty((chunks[0][1], logits.shape[1]), dtype=lse.dtype) if scale is not None else None
        for a, b in chunks:
            if scale is not None:
                # d loss / d logits = (softmax − onehot) · valid / count, built in one reused buffer
                g = torch.sub(logits[a:b], lse[a:b, None], out=buf[: b - a]).exp_()
                g[torch.arange(b - a, device=g.device), safe[a:b]] -= 1.0
                g.mul_(scale[a:b, None])
                g = g.to(logits.dtype)
                if grad_logits is not None:
                    g += grad_logits[a:b]
            else:
                g = grad_logits[a:b]
            if need_h:
                torch.mm(g, weight, out=grad_hidden[a:b])
            if need_w:
                grad_weight.addmm_(g.T, hidden[a:b])
        return grad_hidden, grad_weight, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor):
    """(logits (B, T, V), mean next-token loss) from hidden (B, T, H); labels are shifted inside, -100 ignored."""
    B, T, H = hidden.shape
    shifted = torch.cat((labels[:, 1:], labels.new_full((B, 1), -100)), dim=1)  # position t predicts t+1
    loss, logits = _LinearCrossEntropy.apply(hidden.reshape(B * T, H), weight, shifted.reshape(B * T))
    return logits.view(B, T, -1), loss
