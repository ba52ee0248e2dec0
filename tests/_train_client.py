"""One training client in its own process, for tests/test_multiclient_training.py.

    python tests/_train_client.py ADDRESS CLIENT STEPS

Trains its own bottom model (seeded by CLIENT) against the server's
TrainableComputeFunction for STEPS steps, each on its own batch (also seeded by
CLIENT and the step), sending "x-client" and "x-step" metadata so the server can
log the order in which it ran the steps. The builders below are shared with the
test's local replay.
"""
import sys

import torch

LR_BOTTOM = 0.05
LR_TOP = 0.05


def bottom_model(client: int) -> torch.nn.Module:
    torch.manual_seed(1000 + client)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh())


def top_model() -> torch.nn.Module:
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batch(client: int, step: int):
    g = torch.Generator().manual_seed(client * 100003 + step)
    return torch.randn(4, 6, generator=g), torch.randn(4, 3, generator=g)


def main() -> None:
    torch.set_num_threads(1)
    from splitlearn_comm import ExponentialBackoff, GRPCComputeClient

    address, client_index, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    bottom = bottom_model(client_index)
    opt = torch.optim.SGD(bottom.parameters(), lr=LR_BOTTOM)
    with GRPCComputeClient(address, timeout=60,
                           retry_strategy=ExponentialBackoff(initial_delay=0.05)) as client:
        for step in range(steps):
            x, y = batch(client_index, step)
            md = [("x-client", str(client_index)), ("x-step", str(step))]
            out = client.remote(bottom(x), metadata=md)
            loss = torch.nn.functional.mse_loss(out, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
