//! The `waterfall` command line (being completed).
fn main() -> anyhow::Result<()> {
    Ok(())
}
