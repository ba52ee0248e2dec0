"""The server half the image serves by default: `splitlearn-comm serve model:make_head`.

Replace it with your own module (mount it, or `COPY` it into /app in an image built
FROM this one) and name it in the Deployment's args. A factory keeps the import
cheap and lets each replica build its model when it starts.
"""
import torch

from splitlearn_comm import ModelComputeFunction


def make_head() -> ModelComputeFunction:
    """The top of a small MLP (128 -> 64 -> 10), weights fixed by a seed so every
    replica serves the same model."""
    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    return ModelComputeFunction(head.eval())
