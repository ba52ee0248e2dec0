"""Regenerate the dashboard screenshots under docs/images/ (``make dashboard-screenshot``).

Starts a server hosting a TrainableComputeFunction with its dashboard on a free port,
puts a varying load on it for ``--seconds`` (training steps, i.e. Compute and
ComputeBackward calls, inference calls of changing sizes, a few rejected calls, and
sessions of a few steps each),
then opens the dashboard in headless Chromium and saves a desktop and a phone
screenshot.

    python scripts/dashboard_screenshot.py [--seconds 75] [--out docs/images]
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import headless_chromium  # noqa: E402

logger = logging.getLogger("dashboard_screenshot")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=75.0, help="load before the shot")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "docs",
                                                      "images"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import grpc
    import torch

    import splitlearn_comm as slc

    if headless_chromium.find_chromium() is None:
        logger.error("no Chromium: run scripts/install-system-deps.sh (as root) first")
        return 1
    torch.manual_seed(0)
    torch.set_num_threads(1)

    class Middle(slc.TrainableComputeFunction):
        def forward_model(self, x, *a, **k):  # reject the odd malformed batch
            if x.shape[-1] != 256:
                slc.current_call().abort(grpc.StatusCode.INVALID_ARGUMENT,
                                         f"expected 256 features, got {x.shape[-1]}")
            return super().forward_model(x, *a, **k)

    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(),
                                torch.nn.Linear(512, 256))
    fn = Middle(model, lambda p: torch.optim.SGD(p, lr=0.01), max_entries=2048,
                max_bytes=256 << 20, ttl=10.0)
    server = slc.GRPCComputeServer(fn, host="127.0.0.1", port=0, max_workers=4,
                                   metrics_port=0).start()
    stop = threading.Event()
    t_start = time.monotonic()

    def phase() -> float:  # 0..1, a slow wave so that the charts have a shape
        return 0.5 + 0.5 * math.sin((time.monotonic() - t_start) / 12.0)

    def trainer() -> None:
        with slc.GRPCComputeClient(f"127.0.0.1:{server.port}") as client:
            pending = []
            while not stop.is_set():
                batch = 16 + int(48 * phase())
                x = torch.randn(batch, 256, requires_grad=True)
                pending.append(client.remote(x))
                if len(pending) > 1 + int(6 * phase()):  # forwards waiting in the store
                    pending.pop(0).sum().backward()
                time.sleep(0.01)

    def inference() -> None:
        with slc.GRPCComputeClient(f"127.0.0.1:{server.port}", retry_strategy=None) as client:
            n = 0
            while not stop.is_set():
                n += 1
                features = 255 if n % 40 == 0 else 256
                try:
                    client.compute(torch.randn(8 + int(120 * phase()), features))
                except slc.RpcError:
                    pass
                time.sleep(0.004 + 0.01 * (1 - phase()))

    def sessions() -> None:  # a few sessions open at a time, each a few steps long
        with slc.GRPCComputeClient(f"127.0.0.1:{server.port}") as client:
            n = 0
            while not stop.is_set():
                n += 1
                with client.session() as s:
                    for _ in range(5 + n % 20):
                        if stop.is_set():
                            break
                        s.compute(torch.randn(4, 256))
                        time.sleep(0.05)

    threads = [threading.Thread(target=f, daemon=True)
               for f in (trainer, inference, inference, sessions, sessions)]
    for t in threads:
        t.start()
    try:
        logger.info("dashboard on %s; loading it for %.0f s", server.dashboard_url, args.seconds)
        time.sleep(args.seconds)
        os.makedirs(args.out, exist_ok=True)
        with headless_chromium.Browser() as browser:
            for name, width, height, scale, mobile in (("dashboard.png", 1280, 900, 1, False),
                                                       ("dashboard-phone.png", 390, 844, 2,
                                                        True)):
                page = browser.open(server.dashboard_url, width, height, scale, mobile)
                page.wait_for("window.dashboard && window.dashboard.polls >= 3 && "
                              "+document.querySelector('canvas[data-panel=calls]')"
                              ".dataset.points >= 10", timeout=60)
                page.evaluate("document.querySelector('[data-range=\"60\"]').click()")
                path = page.screenshot(os.path.join(args.out, name))
                logger.info("wrote %s", os.path.relpath(path))
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        server.stop(0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
