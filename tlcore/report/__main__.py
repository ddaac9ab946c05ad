"""`python -m tlcore.report`: the HTML report of a sweep, from its MLflow store."""

import sys

from tlcore.report.page import main

sys.exit(main())
