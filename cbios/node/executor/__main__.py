import sys

from cbios.node.executor import main

sys.exit(main())
