from azaion_loader_dev.cli import main

raise SystemExit(main())
