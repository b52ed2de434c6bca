import torch
import torch.nn.functional as F

from openk2.model.loss import linear_cross_entropy


def reference(hidden, weight, labels):
    logits = hidden @ weight.T
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    return logits, loss


def test_fused_head_matches_unfused_values_and_gradients():
    B, T, H, V = 3, 37, 16, 300  # T*V spans several row chunks
    hidden = torch.randn(B, T, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, V, (B, T))
    labels[0, :9] = -100
    labels[2, -3:] = -100
    logits, loss = linear_cross_entropy(hidden, weight, labels)
    ref_logits, ref_loss = reference(hidden, weight, labels)
    torch.testing.assert_close(logits, ref_logits)
    torch.testing.assert_close(loss, ref_loss)
    # a loss that also uses the logits: both gradient paths must add up
    probe = torch.randn(B, T, V, dtype=torch.float64)
    got = torch.autograd.grad(2 * loss + (logits * probe).sum(), (hidden, weight))
    want = torch.autograd.grad(2 * ref_loss + (ref_logits * probe).sum(), (hidden, weight))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


def test_all_labels_ignored_gives_zero_loss_and_gradient():
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    weight = torch.randn(10, 8, requires_grad=True)
    _, loss = linear_cross_entropy(hidden, weight, torch.full((1, 4), -100))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0
