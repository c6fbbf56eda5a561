"""``python -m benchmark ...`` runs ``boxloop bench`` without the backend's CLI."""

from benchmark.cli import main

raise SystemExit(main())
