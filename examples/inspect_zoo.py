"""Print the analysis table of every bundled example model.

    python examples/inspect_zoo.py [--hf]
"""

from __future__ import annotations

import argparse

import fxgradnas
from fxgradnas.zoo import HF_ZOO, ZOO


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hf", action="store_true", help="also the tiny Hugging Face configs")
    args = parser.parse_args()
    factories = {**ZOO, **(HF_ZOO if args.hf else {})}
    for name, factory in factories.items():
        print(f"\n== {name}")
        print(fxgradnas.analyze(*factory()).table())


if __name__ == "__main__":
    main()
