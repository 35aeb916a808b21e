"""``python -m tunelab``: the CLI; also what ``torchrun -m tunelab train CONFIG`` runs per rank."""

from tunelab.cli import main

if __name__ == "__main__":
    main()
