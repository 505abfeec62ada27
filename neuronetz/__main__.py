"""`python -m neuronetz` is the same program as the `neuronetz-gateway` binary."""

from neuronetz.cli import main

raise SystemExit(main())
