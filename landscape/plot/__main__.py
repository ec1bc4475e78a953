"""``python -m landscape.plot``."""

from .files import main

main()
