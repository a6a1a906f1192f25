"""A small memfit training job for the launcher and lifecycle tests. Each rank records its pid in
--pid-dir (started.RANK once memfit is imported, training.RANK once it trains), then trains a tiny
model until it is killed, so the tests can kill, stop and interrupt real workers by pid."""

import argparse
import os
import time

import torch

import memfit


def record_pid(pid_dir: str, name: str) -> None:
    """Written under a temporary name, then renamed, so a reader never sees an empty file."""
    path = os.path.join(pid_dir, name)
    with open(path + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.replace(path + ".tmp", path)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=os.environ.get("MEMFIT_CONFIG"))
    parser.add_argument("--pid-dir", required=True)
    parser.add_argument("--sleep-before-init", type=float, default=0.0)
    args = parser.parse_args()
    record_pid(args.pid_dir, f"started.{os.environ['RANK']}")
    time.sleep(args.sleep_before_init)
    torch.manual_seed(0)
    # joins the group with the config's collective_timeout_s, as a user's script does
    engine = memfit.initialize(torch.nn.Linear(16, 16), args.config)
    record_pid(args.pid_dir, f"training.{engine.rank}")
    while True:
        loss = engine(torch.randn(4, 16)).square().mean()
        engine.backward(loss)
        engine.step()
        time.sleep(0.02)


if __name__ == "__main__":
    main()
