from diffplat.cli import main
import sys
sys.exit(main())
