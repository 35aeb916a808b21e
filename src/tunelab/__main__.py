"""``python -m tunelab``: the CLI; also what ``torchrun -m tunelab train CONFIG`` runs per rank."""

from tunelab.cli import entry

if __name__ == "__main__":
    entry()
