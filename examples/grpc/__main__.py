import sys

from examples.grpc.run import main

sys.exit(main())
