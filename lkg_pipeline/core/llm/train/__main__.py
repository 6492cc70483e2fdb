from lkg_pipeline.core.llm.train.script import main

if __name__ == "__main__":
    raise SystemExit(main())
