from imatch.cli import main

raise SystemExit(main())
