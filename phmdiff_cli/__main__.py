"""`python -m phmdiff_cli` (also what `torchrun -m phmdiff_cli train ...` runs)."""

from phmdiff_cli.cli.app import main

if __name__ == "__main__":
    main()
