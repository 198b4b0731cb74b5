//! Enums of named choices (a command-line value, a recipe field): `Display` writes the name,
//! `FromStr` reads it back (surrounding spaces ignored), and an unknown name is an error
//! that lists the known ones.

/// `Display` and `FromStr` for `$choice`, which has `ALL` (every choice, in the order the
/// error lists them) and `fn name(self) -> &'static str`; `$what` names the kind of choice
/// in the error ("unknown `$what` `x` (a, b)").
macro_rules! named_choices {
    ($choice:ty, $what:literal) => {
        impl std::fmt::Display for $choice {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }

        impl std::str::FromStr for $choice {
            type Err = crate::error::Error;
            fn from_str(s: &str) -> crate::error::Result<Self> {
                <$choice>::ALL.into_iter().find(|c| c.name() == s.trim()).ok_or_else(|| {
                    let known: Vec<&str> = <$choice>::ALL.iter().map(|c| c.name()).collect();
                    crate::error::Error::Invalid(format!(concat!("unknown ", $what, " `{}` ({})"), s, known.join(", ")))
                })
            }
        }
    };
}
