"""``python -m landscape.plot``: the command (:mod:`landscape.commands.plot`)."""

from ..commands.plot import main

main()
