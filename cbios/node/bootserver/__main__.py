import sys

from cbios.node.bootserver import main

sys.exit(main())
