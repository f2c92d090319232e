//! `courier config`: the effective configuration as TOML, secrets redacted, or the docs
//! generated from the definition of every setting.

use std::io::Write;

use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// `courier config` flags: without one, the effective configuration.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
#[group(multiple = false)]
pub struct ConfigArgs {
    /// Print the README's table of every variable (Markdown) instead.
    #[arg(long)]
    pub markdown: bool,
    /// Print config/courier.toml, every key with its default and meaning, instead.
    #[arg(long, visible_alias = "toml")]
    pub toml_template: bool,
}

impl ConfigArgs {
    /// Whether a flag asks for the generated docs, which need no configuration: the command
    /// line prints them without loading one, so a configuration that does not load cannot
    /// hide the docs that would fix it.
    pub fn wants_docs(&self) -> bool {
        self.markdown || self.toml_template
    }
}

/// `courier config`: the docs a flag asks for, else `config` as TOML, to stdout.
///
/// # Errors
/// When stdout cannot be written.
pub async fn run(
    config: Config,
    args: ConfigArgs,
    _shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut out = std::io::stdout();
    if !print_docs(args, &mut out)? {
        out.write_all(config.to_toml().as_bytes())?;
    }
    Ok(())
}

/// `--markdown` or `--toml-template`: the docs generated from the definition of every
/// setting. Returns whether a flag asked for them.
///
/// # Errors
/// When `out` cannot be written.
pub fn print_docs(args: ConfigArgs, out: &mut impl Write) -> std::io::Result<bool> {
    let text = if args.markdown {
        crate::config::docs::markdown_table()
    } else if args.toml_template {
        crate::config::docs::toml_template()
    } else {
        return Ok(false);
    };
    out.write_all(text.as_bytes())?;
    Ok(true)
}
