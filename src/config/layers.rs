//! The three layers (TOML file < `SOCKVISOR_*` environment < command line, see `cli`), each
//! a [`Layer`]: one optional value per key of the table, with where it came from.

use super::keys::{self, Kind, KEYS, LISTEN_KEYS};
use super::values::{self, parse_listen, parse_listen_url, FromValue, Value, LISTEN_FORMS};
use super::{check_listener_name, ConfigError, DispatchPolicy, ListenAddr};
use std::path::{Path, PathBuf};
use toml::de::{DeTable, DeValue};
use toml::Spanned;

/// Where a value came from, for error messages.
#[derive(Debug, Clone)]
pub(crate) enum Origin {
    File { path: PathBuf, line: Option<usize> },
    Env(String),
    Cli(String),
}

impl Origin {
    /// An error about `key` (a TOML key; the variable or the flag is named instead for
    /// those). An empty `fix` means the message says it.
    pub(crate) fn err(
        &self,
        key: &str,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> ConfigError {
        let fix = Some(fix.into()).filter(|f| !f.is_empty());
        match self {
            Origin::File { path, line } => ConfigError {
                file: Some(path.clone()),
                line: *line,
                key: Some(key.to_string()),
                message: message.into(),
                fix,
            },
            Origin::Env(var) | Origin::Cli(var) => ConfigError {
                file: None,
                line: None,
                key: Some(var.clone()),
                message: message.into(),
                fix,
            },
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct At<T> {
    pub v: T,
    pub at: Origin,
}

/// A listener as one layer gives it, before names and policies are resolved.
#[derive(Debug, Clone)]
pub(crate) struct RawListener {
    pub name: Option<String>,
    pub addr: Option<ListenAddr>,
    pub policy: Option<DispatchPolicy>,
    pub at: Origin,
}

impl RawListener {
    pub(crate) fn new(name: Option<String>, addr: Option<ListenAddr>, at: Origin) -> Self {
        RawListener {
            name,
            addr,
            policy: None,
            at,
        }
    }
}

/// One layer's worth of settings, indexed like [`KEYS`]; `None` = not set in this layer.
#[derive(Debug, Clone)]
pub(crate) struct Layer {
    values: Vec<Option<At<Value>>>,
}

impl Default for Layer {
    fn default() -> Self {
        Layer {
            values: vec![None; KEYS.len()],
        }
    }
}

fn index(name: &str) -> usize {
    match keys::by_name(name) {
        Some((i, _)) => i,
        None => panic!("`{name}` is not in the table of config keys"),
    }
}

impl Layer {
    pub(crate) fn set(&mut self, name: &str, v: Value, at: Origin) {
        self.values[index(name)] = Some(At { v, at });
    }

    /// Set `name` from its string form (environment, command line, or a TOML scalar).
    pub(crate) fn set_str(&mut self, name: &str, s: &str, at: &Origin) -> Result<(), ConfigError> {
        let kind = KEYS[index(name)].kind;
        let v = values::parse(kind, s, at).map_err(|(m, f)| at.err(name, m, f))?;
        self.set(name, v, at.clone());
        Ok(())
    }

    pub(crate) fn is_set(&self, name: &str) -> bool {
        self.values[index(name)].is_some()
    }

    /// The value of `name` if this layer sets it, as the type `resolve` reads it as.
    pub(crate) fn take<T: FromValue>(&mut self, name: &str) -> Option<At<T>> {
        let At { v, at } = self.values[index(name)].take()?;
        match T::from_value(v) {
            Some(v) => Some(At { v, at }),
            None => panic!("config key `{name}` is read as a type its kind does not give"),
        }
    }

    pub(crate) fn get<T: FromValue>(&self, name: &str) -> Option<T> {
        let v = self.values[index(name)].as_ref()?.v.clone();
        T::from_value(v)
    }

    /// Overlay `top` on `self`: every value `top` sets wins.
    pub(crate) fn overlay(self, top: Layer) -> Layer {
        Layer {
            values: self
                .values
                .into_iter()
                .zip(top.values)
                .map(|(below, above)| above.or(below))
                .collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// TOML file
// ---------------------------------------------------------------------------------------------

fn line_of(src: &str, offset: usize) -> usize {
    let end = offset.min(src.len());
    src.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

fn type_name(v: &DeValue<'_>) -> &'static str {
    match v {
        DeValue::String(_) => "a string",
        DeValue::Integer(_) => "an integer",
        DeValue::Float(_) => "a float",
        DeValue::Boolean(_) => "a boolean",
        DeValue::Datetime(_) => "a datetime",
        DeValue::Array(_) => "an array",
        DeValue::Table(_) => "a table",
    }
}

/// A TOML scalar as the string the value parsers take.
fn scalar(v: &DeValue<'_>) -> Result<String, String> {
    match v {
        DeValue::String(s) => Ok(s.to_string()),
        DeValue::Integer(i) => {
            let digits = i.as_str().replace('_', "");
            i128::from_str_radix(&digits, i.radix())
                .map(|n| n.to_string())
                .map_err(|_| format!("integer {} out of range", i.as_str()))
        }
        DeValue::Float(f) => Ok(f.as_str().replace('_', "")),
        DeValue::Boolean(b) => Ok(b.to_string()),
        other => Err(format!("expected a value, got {}", type_name(other))),
    }
}

/// What TOML shapes a kind takes, for type errors.
fn toml_shape(kind: Kind) -> &'static str {
    match kind {
        Kind::Command => "an array of strings or a string",
        Kind::ExitCodes => "an array of integers",
        Kind::Listen => "[[listen]] tables",
        Kind::Switch => "true or false",
        _ => "a string or a number",
    }
}

struct FileCtx<'a> {
    path: &'a Path,
    src: &'a str,
}

impl FileCtx<'_> {
    fn at(&self, span: std::ops::Range<usize>) -> Origin {
        Origin::File {
            path: self.path.to_path_buf(),
            line: Some(line_of(self.src, span.start)),
        }
    }
}

/// The unknown-key error, with a suggestion as its fix when one is close.
fn unknown_key(
    at: &Origin,
    full: &str,
    key: &str,
    context: &str,
    candidates: impl IntoIterator<Item = &'static str>,
    fix: &str,
) -> ConfigError {
    let fix = match keys::closest(key, candidates) {
        Some(c) => format!("did you mean `{c}`?"),
        None => fix.to_string(),
    };
    at.err(full, format!("unknown key `{key}`{context}"), fix)
}

pub(crate) fn file_layer(path: &Path, src: &str) -> Result<Layer, ConfigError> {
    let doc = DeTable::parse(src).map_err(|e| ConfigError {
        file: Some(path.to_path_buf()),
        line: e.span().map(|s| line_of(src, s.start)),
        key: None,
        message: format!("invalid TOML: {}", e.message().trim()),
        fix: Some("fix the syntax at that line".into()),
    })?;
    let ctx = FileCtx { path, src };
    let mut layer = Layer::default();
    for (k, v) in doc.get_ref().iter() {
        let name: &str = k.get_ref();
        let Some((_, key)) = keys::by_name(name) else {
            return Err(unknown_key(
                &ctx.at(k.span()),
                name,
                name,
                "",
                keys::names(),
                "the valid keys are listed in docs/config.md",
            ));
        };
        let vat = ctx.at(v.span());
        let value = match (key.kind, v.get_ref()) {
            (Kind::Command, DeValue::Array(items)) => file_command(&ctx, name, items, &vat)?,
            (Kind::ExitCodes, DeValue::Array(items)) => file_exit_codes(&ctx, name, items)?,
            (Kind::Listen, DeValue::Array(items)) => Value::Listeners(
                items
                    .iter()
                    .map(|item| file_listener(&ctx, item))
                    .collect::<Result<_, _>>()?,
            ),
            (Kind::Switch, DeValue::Boolean(_))
            | (_, DeValue::String(_) | DeValue::Integer(_) | DeValue::Float(_)) => {
                let s = scalar(v.get_ref()).map_err(|m| vat.err(name, m, ""))?;
                values::parse(key.kind, &s, &vat).map_err(|(m, f)| vat.err(name, m, f))?
            }
            (kind, other) => {
                return Err(vat.err(
                    name,
                    format!("expected {}, got {}", toml_shape(kind), type_name(other)),
                    "see docs/config.md for this key's type",
                ))
            }
        };
        layer.set(name, value, vat);
    }
    Ok(layer)
}

fn file_command(
    ctx: &FileCtx<'_>,
    key: &str,
    items: &[Spanned<DeValue<'_>>],
    at: &Origin,
) -> Result<Value, ConfigError> {
    let mut cmd = Vec::new();
    for item in items {
        match item.get_ref() {
            DeValue::String(s) => cmd.push(s.to_string()),
            other => {
                return Err(ctx.at(item.span()).err(
                    key,
                    format!(
                        "expected an array of strings, got {} in it",
                        type_name(other)
                    ),
                    "quote every argument, e.g. command = [\"/usr/bin/myapp\", \"--port\", \"0\"]",
                ))
            }
        }
    }
    if cmd.is_empty() {
        return Err(at.err(
            key,
            "the command is empty",
            "give the program to run, e.g. command = [\"/usr/bin/myapp\"]",
        ));
    }
    Ok(Value::Command(cmd))
}

fn file_exit_codes(
    ctx: &FileCtx<'_>,
    key: &str,
    items: &[Spanned<DeValue<'_>>],
) -> Result<Value, ConfigError> {
    let mut codes = Vec::new();
    for item in items {
        let iat = ctx.at(item.span());
        let s = match item.get_ref() {
            DeValue::Integer(_) => scalar(item.get_ref()).map_err(|m| iat.err(key, m, ""))?,
            other => {
                return Err(iat.err(
                    key,
                    format!(
                        "expected an array of exit codes, got {} in it",
                        type_name(other)
                    ),
                    "list exit codes like [2, 78]",
                ))
            }
        };
        codes.push(values::parse_exit_code(&s).map_err(|(m, f)| iat.err(key, m, f))?);
    }
    Ok(Value::ExitCodes(codes))
}

fn file_listener(
    ctx: &FileCtx<'_>,
    item: &Spanned<DeValue<'_>>,
) -> Result<RawListener, ConfigError> {
    let at = ctx.at(item.span());
    let table = match item.get_ref() {
        DeValue::Table(t) => t,
        DeValue::String(s) => {
            let (name, addr) = parse_listen(s).map_err(|m| at.err("listen", m, LISTEN_FORMS))?;
            return Ok(RawListener::new(name, Some(addr), at));
        }
        other => {
            return Err(at.err(
                "listen",
                format!("expected a [[listen]] table, got {}", type_name(other)),
                "write [[listen]] name = \"web\" url = \"tcp://127.0.0.1:8000\"",
            ))
        }
    };
    let mut l = RawListener::new(None, None, at.clone());
    for (k, v) in table.iter() {
        let key: &str = k.get_ref();
        let full = format!("listen.{key}");
        if !LISTEN_KEYS.contains(&key) {
            return Err(unknown_key(
                &ctx.at(k.span()),
                &full,
                key,
                " in [[listen]]",
                LISTEN_KEYS.iter().copied(),
                "a [[listen]] table has name, url and dispatch",
            ));
        }
        let vat = ctx.at(v.span());
        let s = match v.get_ref() {
            DeValue::String(s) => s.to_string(),
            other => {
                return Err(vat.err(
                    &full,
                    format!("expected a string, got {}", type_name(other)),
                    "quote the value",
                ))
            }
        };
        match key {
            "name" => {
                check_listener_name(&s)
                    .map_err(|m| vat.err(&full, m, "use a name like \"web\""))?;
                l.name = Some(s);
            }
            "url" => {
                let addr = parse_listen_url(&s).map_err(|m| vat.err(&full, m, LISTEN_FORMS))?;
                l.addr = Some(addr);
            }
            _ => {
                let p = values::parse_policy(&s).map_err(|(m, f)| vat.err(&full, m, f))?;
                l.policy = Some(p);
            }
        }
    }
    if l.name.is_none() && l.addr.is_none() {
        return Err(at.err(
            "listen",
            "a [[listen]] table needs a name, a url, or both",
            "add name = \"web\" (the FileDescriptorName= systemd passes) and/or url = \"tcp://127.0.0.1:8000\"",
        ));
    }
    Ok(l)
}

// ---------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------

/// The last value of `key` in `env` (as the process environment would have it).
pub(crate) fn env_get<'a>(env: &'a [(String, String)], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

pub(crate) fn env_layer(env: &[(String, String)]) -> Result<Layer, ConfigError> {
    let mut layer = Layer::default();
    for key in KEYS {
        if let Some(v) = env_get(env, key.env) {
            layer.set_str(key.name, v, &Origin::Env(key.env.to_string()))?;
        }
    }
    for (k, _) in env {
        let known = KEYS.iter().any(|key| key.env == k) || keys::ENV_NOT_KEYS.contains(&k.as_str());
        if known || !k.starts_with("SOCKVISOR_") {
            continue;
        }
        let rest = k["SOCKVISOR_".len()..].to_ascii_lowercase();
        match keys::closest(&rest, keys::names()).and_then(keys::by_name) {
            Some((_, c)) => log::warn!("ignoring unknown variable {k} (did you mean {}?)", c.env),
            None => log::warn!("ignoring unknown variable {k}"),
        }
    }
    Ok(layer)
}
