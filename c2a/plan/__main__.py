import sys

from c2a.plan.cli import main

sys.exit(main(sys.argv[1:]))
