import sys

from examples.flaky.run import main

sys.exit(main())
