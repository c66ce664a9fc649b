from kdrl.cli import main

raise SystemExit(main())
