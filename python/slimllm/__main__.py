from slimllm.cli import main

raise SystemExit(main())
