"""Thin command lines: argparse, logging set-up (_cli.setup_logging), one call into model/ or pipeline/.

    compress_bucket  -> pipeline.compress.run_compress
    decode           -> pipeline.decode.decode_archive
    evaluate         -> model.evaluation.evaluate, model.report.write_report
    import_uqdm      -> model.uqdm.importer.import_checkpoint
    train            -> model.cdc.train.fit
    derive_rates     -> model.cdc.train.with_derived_rates
"""
