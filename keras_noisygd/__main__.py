"""`python -m keras_noisygd`: the comparison command line."""

import sys

from keras_noisygd.experiments.cli import main

sys.exit(main())
