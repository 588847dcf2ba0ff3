//! The demo: the paper's experiment in miniature on the built-in data. Pretrain a
//! base model, SFT it, align it with DPO under AdamW, OnDARE and OnTIES, and
//! interpolate the AdamW model back toward SFT; then measure reward and tax for
//! each and write a table, CSV, JSON and an SVG plot.

pub mod cli;
pub mod judge;
pub mod pipeline;
pub mod plot;
pub mod report;
