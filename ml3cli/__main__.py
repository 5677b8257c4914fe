"""``python -m ml3cli`` = ``ml3`` (torchrun starts its processes this way: ``torchrun ... -m ml3cli meta-train``)."""

from ml3cli.entry import main

if __name__ == "__main__":
    main()
