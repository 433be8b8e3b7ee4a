"""The routing-path predictor (ExpertFlow): from a request's prompt, each MoE layer's expected
share of its tokens' expert choices, before the request computes anything.

A bag of hashed prompt unigrams and bigrams, averaged (``EmbeddingBag``), then a two-layer MLP
to one softmax over the experts per layer. Small (about 0.3 M parameters), trained in seconds on
router traces with a seeded generator, so the same traces and seed give the same weights.
Trained against each request's decode-time shares (the tokens that run step after step).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tierserve.experts.routes import PredictedRoute, RequestTrace

_BIGRAM_MIX = 1_000_003


@dataclass(slots=True)
class PredictorSpec:
    layers: list[int]
    num_experts: int
    top_k: int
    buckets: int = 4096
    dim: int = 64
    hidden: int = 128


class RoutePredictor(torch.nn.Module):
    def __init__(self, spec: PredictorSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed = torch.nn.EmbeddingBag(spec.buckets, spec.dim, mode="mean")
        self.hidden = torch.nn.Linear(spec.dim, spec.hidden)
        self.out = torch.nn.Linear(spec.hidden, len(spec.layers) * spec.num_experts)

    def features(self, prompt: list[int]) -> torch.Tensor:
        buckets = self.spec.buckets
        grams = [t % buckets for t in prompt]
        grams += [(a * _BIGRAM_MIX + b) % buckets for a, b in zip(prompt, prompt[1:])]
        return torch.tensor(grams or [0], dtype=torch.int64)

    def forward(self, prompts: list[list[int]]) -> torch.Tensor:
        """(B,) prompts -> (B, layers, experts) log-shares."""
        feats = [self.features(p) for p in prompts]
        offsets = torch.tensor([0] + [len(f) for f in feats[:-1]]).cumsum(0)
        bag = self.embed(torch.cat(feats), offsets)  # (B, dim)
        logits = self.out(F.relu(self.hidden(bag)))
        return F.log_softmax(logits.view(len(prompts), len(self.spec.layers), -1), dim=-1)

    @torch.inference_mode()
    def predict(self, prompt: list[int]) -> PredictedRoute:
        shares = self.forward([list(prompt)])[0].exp()
        return PredictedRoute({layer: shares[i].tolist() for i, layer in enumerate(self.spec.layers)})

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "predictor.json").write_text(json.dumps(asdict(self.spec), indent=1))
        torch.save(self.state_dict(), path / "predictor.pt")

    @classmethod
    def load(cls, path: str | Path) -> RoutePredictor:
        path = Path(path)
        if not (path / "predictor.json").is_file():
            raise FileNotFoundError(f"{path} holds no routing-path predictor (predictor.json); "
                                    "train one with `tierserve moe train-predictor`")
        predictor = cls(PredictorSpec(**json.loads((path / "predictor.json").read_text())))
        predictor.load_state_dict(torch.load(path / "predictor.pt", weights_only=True))
        return predictor.eval()


def target_shares(trace: RequestTrace, layers: list[int], num_experts: int) -> torch.Tensor:
    """(layers, experts): the decode positions' shares (all positions if it generated none)."""
    start = len(trace.prompt) if trace.num_positions > len(trace.prompt) else 0
    return torch.tensor([trace.shares(layer, num_experts, start) for layer in layers])


@dataclass(slots=True)
class PredictorReport:
    train_requests: int
    held_out_requests: int
    precision: float  # of the predicted hot experts (share >= 1/E), how many were hot
    recall: float  # of the hot experts, how many were predicted
    prior_precision: float  # the same for the traces' average shares (what static knows)
    prior_recall: float
    kl: float  # held-out KL(true || predicted) per layer, nats
    prior_kl: float


def train_predictor(traces: list[RequestTrace], layers: list[int], num_experts: int, top_k: int,
                    epochs: int = 300, seed: int = 0, lr: float = 3e-3, holdout_every: int = 5,
                    weight_decay: float = 1e-5,
                    spec: PredictorSpec | None = None) -> tuple[RoutePredictor, PredictorReport]:
    """Fit on all traces but every ``holdout_every``-th, report on those (seeded, CPU)."""
    if len(traces) < 2:
        raise ValueError(f"training a predictor needs at least 2 traced requests, got {len(traces)}")
    torch.manual_seed(seed)
    spec = spec or PredictorSpec(list(layers), num_experts, top_k)
    model = RoutePredictor(spec)
    held = [t for i, t in enumerate(traces) if i % holdout_every == holdout_every - 1]
    train = [t for t in traces if t not in held] or traces
    targets = torch.stack([target_shares(t, spec.layers, num_experts) for t in train])
    prompts = [t.prompt for t in train]
    # Start from the traces' average shares (the output layer's bias, zero weights), so training
    # learns only what a prompt adds to it: with few traces, a predictor from scratch overfits
    # and loses to the average (measured: held-out KL 0.38 vs 0.29 on the MoEfied SmolLM2).
    with torch.no_grad():
        model.out.weight.zero_()
        model.out.bias.copy_(targets.mean(dim=0).clamp_min(1e-6).log().flatten())
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        optimizer.zero_grad()
        loss = -(targets * model(prompts)).sum(dim=-1).mean()  # cross-entropy to the shares
        loss.backward()
        optimizer.step()
    model.eval()
    prior = targets.mean(dim=0)
    return model, _report(model, held or train, len(train), prior, spec, num_experts)


def _report(model: RoutePredictor, held: list[RequestTrace], num_train: int, prior: torch.Tensor,
            spec: PredictorSpec, num_experts: int) -> PredictorReport:
    truth = torch.stack([target_shares(t, spec.layers, num_experts) for t in held])
    with torch.inference_mode():
        predicted = model([t.prompt for t in held]).exp()
    def precision_recall(guess: torch.Tensor) -> tuple[float, float]:
        return hot_precision_recall(guess, truth, num_experts)

    def kl(guess: torch.Tensor) -> float:
        guess = guess.clamp_min(1e-9)
        terms = torch.where(truth > 0, truth * (truth.clamp_min(1e-9).log() - guess.log()), 0.0)
        return float(terms.sum(dim=-1).mean())

    p, r = precision_recall(predicted)
    pp, pr = precision_recall(prior.expand_as(truth))
    return PredictorReport(num_train, len(held), p, r, pp, pr, kl(predicted),
                           kl(prior.expand_as(truth)))


def hot_precision_recall(guess: torch.Tensor, truth: torch.Tensor, num_experts: int
                         ) -> tuple[float, float]:
    """Precision and recall of the predicted hot experts (share >= 1/E) against the true ones;
    ``guess`` and ``truth`` are shares of the same shape."""
    threshold = 1.0 / num_experts
    hot, said = truth >= threshold, guess >= threshold
    both = (hot & said).sum().item()
    return both / max(1, said.sum().item()), both / max(1, hot.sum().item())


def report_json(report: PredictorReport) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v)
            for k, v in asdict(report).items()}
