from lkg_pipeline.core.llm.rank.job import main

if __name__ == "__main__":
    raise SystemExit(main())
