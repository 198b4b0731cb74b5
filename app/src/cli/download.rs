//! `mtp download REPO_ID`.

use mtp_core::source::{HubOptions, ModelSource};

use super::progress::DownloadBar;

/// Arguments of `mtp download`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// `owner/name` on the Hugging Face hub.
    pub repo_id: String,
    /// Branch, tag or commit.
    #[arg(long, default_value = "main")]
    pub revision: String,
}

/// Run it: download (or find in the cache) and print the local folder.
pub fn run(args: Args) -> anyhow::Result<()> {
    let source = ModelSource::Hub { repo_id: args.repo_id, revision: args.revision };
    let dir = source.resolve(&HubOptions::from_env(), &mut DownloadBar::new())?;
    println!("{}", dir.display());
    Ok(())
}
