//! `autounattend.xml`: Windows Setup's answers, so that an install needs no one at the
//! screen. Setup looks for the file at the root of every removable drive, so it goes on
//! the configuration ISO beside the first-logon script.
//!
//! The passes, as Windows runs them:
//! - `windowsPE`: language, the virtio-win drivers Setup needs to see the virtio disk
//!   (`PnpCustomizationsWinPE`), Windows 11's `LabConfig` bypasses, the GPT layout for
//!   UEFI, which image to install, the EULA;
//! - `specialize`: computer name, time zone;
//! - `oobeSystem`: no questions, a local administrator with `AutoLogon`, and the
//!   `FirstLogonCommands` that find and run the first-logon script.

use super::media::{required_virtio_win_paths, WindowsVersion};

/// Everything the answer file is made from.
#[derive(Debug, Clone)]
pub struct Answers<'a> {
    pub version: WindowsVersion,
    /// The image's index in install.wim (`/IMAGE/INDEX`).
    pub image_index: u32,
    pub computer_name: &'a str,
    /// The local administrator that logs on by itself and that SSH logs in as.
    pub user: &'a str,
    pub password: &'a str,
    /// The script on the configuration ISO the first logon runs (`first_logon::SETUP_CMD`).
    pub first_logon_script: &'a str,
}

/// Drive letters the two CD-ROMs may get in Windows PE and after setup; a driver path on
/// a letter that is not there is skipped by Setup.
const CD_LETTERS: [char; 4] = ['D', 'E', 'F', 'G'];

const COMPONENT_ATTRS: &str = r#"processorArchitecture="amd64" publicKeyToken="31bf3856ad364e35" language="neutral" versionScope="nonSxS""#;

pub fn answer_file(a: &Answers) -> String {
    let mut driver_paths = String::new();
    let mut key = 1;
    for letter in CD_LETTERS {
        for dir in required_virtio_win_paths(a.version)
            .iter()
            .filter(|p| !p.ends_with(".msi"))
        {
            let path = format!("{letter}:{}", dir.replace('/', "\\"));
            driver_paths.push_str(&format!(
                "        <PathAndCredentials wcm:action=\"add\" wcm:keyValue=\"{key}\"><Path>{}</Path></PathAndCredentials>\n",
                escape(&path)
            ));
            key += 1;
        }
    }
    let mut lab_config = String::new();
    if a.version.needs_tpm() {
        // vmbuild gives Windows 11 a TPM (swtpm) and UEFI; the bypasses keep Setup from
        // refusing a machine whose firmware or memory it judges otherwise (no Secure Boot
        // keys enrolled, under 4 GiB of memory for a small build target).
        for (order, check) in ["BypassTPMCheck", "BypassSecureBootCheck", "BypassRAMCheck"]
            .iter()
            .enumerate()
        {
            lab_config.push_str(&format!(
                "        <RunSynchronousCommand wcm:action=\"add\"><Order>{}</Order><Path>reg add HKLM\\SYSTEM\\Setup\\LabConfig /v {check} /t REG_DWORD /d 1 /f</Path></RunSynchronousCommand>\n",
                order + 1
            ));
        }
    }
    let run_synchronous = if lab_config.is_empty() {
        String::new()
    } else {
        format!("      <RunSynchronous>\n{lab_config}      </RunSynchronous>\n")
    };
    // The configuration ISO's letter is not known in advance: look on each.
    let first_logon = format!(
        "cmd /c for %d in (D E F G H I J K L M N O P Q R S T U V W Y Z) do @if exist %d:\\{script} (call %d:\\{script} %d: &amp; exit /b)",
        script = escape(a.first_logon_script)
    );
    format!(
        r#"<?xml version="1.0" encoding="utf-8"?>
<!-- Written by vmbuild bootstrap, profile windows-cygwin, for {version}. -->
<unattend xmlns="urn:schemas-microsoft-com:unattend" xmlns:wcm="http://schemas.microsoft.com/WMIConfig/2002/State" xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance">
  <settings pass="windowsPE">
    <component name="Microsoft-Windows-International-Core-WinPE" {attrs}>
      <SetupUILanguage><UILanguage>en-US</UILanguage></SetupUILanguage>
      <InputLocale>en-US</InputLocale>
      <SystemLocale>en-US</SystemLocale>
      <UILanguage>en-US</UILanguage>
      <UserLocale>en-US</UserLocale>
    </component>
    <component name="Microsoft-Windows-PnpCustomizationsWinPE" {attrs}>
      <DriverPaths>
{driver_paths}      </DriverPaths>
    </component>
    <component name="Microsoft-Windows-Setup" {attrs}>
{run_synchronous}      <DiskConfiguration>
        <Disk wcm:action="add">
          <DiskID>0</DiskID>
          <WillWipeDisk>true</WillWipeDisk>
          <CreatePartitions>
            <CreatePartition wcm:action="add"><Order>1</Order><Type>EFI</Type><Size>260</Size></CreatePartition>
            <CreatePartition wcm:action="add"><Order>2</Order><Type>MSR</Type><Size>16</Size></CreatePartition>
            <CreatePartition wcm:action="add"><Order>3</Order><Type>Primary</Type><Extend>true</Extend></CreatePartition>
          </CreatePartitions>
          <ModifyPartitions>
            <ModifyPartition wcm:action="add"><Order>1</Order><PartitionID>1</PartitionID><Format>FAT32</Format><Label>System</Label></ModifyPartition>
            <ModifyPartition wcm:action="add"><Order>2</Order><PartitionID>2</PartitionID></ModifyPartition>
            <ModifyPartition wcm:action="add"><Order>3</Order><PartitionID>3</PartitionID><Format>NTFS</Format><Label>Windows</Label><Letter>C</Letter></ModifyPartition>
          </ModifyPartitions>
        </Disk>
      </DiskConfiguration>
      <ImageInstall>
        <OSImage>
          <InstallFrom>
            <MetaData wcm:action="add"><Key>/IMAGE/INDEX</Key><Value>{index}</Value></MetaData>
          </InstallFrom>
          <InstallTo><DiskID>0</DiskID><PartitionID>3</PartitionID></InstallTo>
        </OSImage>
      </ImageInstall>
      <UserData>
        <AcceptEula>true</AcceptEula>
        <ProductKey><WillShowUI>Never</WillShowUI></ProductKey>
      </UserData>
    </component>
  </settings>
  <settings pass="specialize">
    <component name="Microsoft-Windows-Shell-Setup" {attrs}>
      <ComputerName>{computer}</ComputerName>
      <TimeZone>UTC</TimeZone>
    </component>
  </settings>
  <settings pass="oobeSystem">
    <component name="Microsoft-Windows-International-Core" {attrs}>
      <InputLocale>en-US</InputLocale>
      <SystemLocale>en-US</SystemLocale>
      <UILanguage>en-US</UILanguage>
      <UserLocale>en-US</UserLocale>
    </component>
    <component name="Microsoft-Windows-Shell-Setup" {attrs}>
      <OOBE>
        <HideEULAPage>true</HideEULAPage>
        <HideLocalAccountScreen>true</HideLocalAccountScreen>
        <HideOEMRegistrationScreen>true</HideOEMRegistrationScreen>
        <HideOnlineAccountScreens>true</HideOnlineAccountScreens>
        <HideWirelessSetupInOOBE>true</HideWirelessSetupInOOBE>
        <ProtectYourPC>3</ProtectYourPC>
      </OOBE>
      <UserAccounts>
        <LocalAccounts>
          <LocalAccount wcm:action="add">
            <Name>{user}</Name>
            <Group>Administrators</Group>
            <Password><Value>{password}</Value><PlainText>true</PlainText></Password>
          </LocalAccount>
        </LocalAccounts>
      </UserAccounts>
      <AutoLogon>
        <Enabled>true</Enabled>
        <Username>{user}</Username>
        <Password><Value>{password}</Value><PlainText>true</PlainText></Password>
        <LogonCount>9999</LogonCount>
      </AutoLogon>
      <FirstLogonCommands>
        <SynchronousCommand wcm:action="add">
          <Order>1</Order>
          <CommandLine>{first_logon}</CommandLine>
          <Description>vmbuild: Cygwin, sshd, virtio-fs, then say ready</Description>
          <RequiresUserInput>false</RequiresUserInput>
        </SynchronousCommand>
      </FirstLogonCommands>
    </component>
  </settings>
</unattend>
"#,
        version = a.version.name(),
        attrs = COMPONENT_ATTRS,
        index = a.image_index,
        computer = escape(a.computer_name),
        user = escape(a.user),
        password = escape(a.password),
    )
}

/// Text for an XML element or attribute value.
pub fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answers(version: WindowsVersion) -> Answers<'static> {
        Answers {
            version,
            image_index: 6,
            computer_name: "VMBUILD",
            user: "vmbuild",
            password: "p<&>\"'w",
            first_logon_script: "vmbuild\\setup.cmd",
        }
    }

    fn component<'a>(
        doc: &'a roxmltree::Document,
        pass: &str,
        name: &str,
    ) -> Option<roxmltree::Node<'a, 'a>> {
        doc.descendants()
            .find(|n| n.has_tag_name("settings") && n.attribute("pass") == Some(pass))?
            .children()
            .find(|c| c.has_tag_name("component") && c.attribute("name") == Some(name))
    }

    fn texts<'a>(node: roxmltree::Node<'a, 'a>, tag: &str) -> Vec<&'a str> {
        node.descendants()
            .filter(|n| n.has_tag_name(tag))
            .filter_map(|n| n.text())
            .collect()
    }

    #[test]
    fn every_version_gets_a_well_formed_file_with_the_passes_and_components_setup_needs() {
        for version in [
            WindowsVersion::Windows10,
            WindowsVersion::Windows11,
            WindowsVersion::Server2022,
        ] {
            let xml = answer_file(&answers(version));
            let doc = roxmltree::Document::parse(&xml).expect("well-formed");
            assert_eq!(
                doc.root_element().tag_name().namespace(),
                Some("urn:schemas-microsoft-com:unattend")
            );
            for (pass, name) in [
                ("windowsPE", "Microsoft-Windows-International-Core-WinPE"),
                ("windowsPE", "Microsoft-Windows-PnpCustomizationsWinPE"),
                ("windowsPE", "Microsoft-Windows-Setup"),
                ("specialize", "Microsoft-Windows-Shell-Setup"),
                ("oobeSystem", "Microsoft-Windows-Shell-Setup"),
            ] {
                let c = component(&doc, pass, name)
                    .unwrap_or_else(|| panic!("{version:?}: no {name} in {pass}"));
                assert_eq!(c.attribute("processorArchitecture"), Some("amd64"));
                assert_eq!(c.attribute("publicKeyToken"), Some("31bf3856ad364e35"));
            }
            let setup = component(&doc, "windowsPE", "Microsoft-Windows-Setup").unwrap();
            assert_eq!(texts(setup, "Value"), ["6"], "{version:?}: the image index");
            assert_eq!(texts(setup, "AcceptEula"), ["true"]);

            // Every driver directory virtio-win has for this version, on each CD letter.
            let pnp = component(
                &doc,
                "windowsPE",
                "Microsoft-Windows-PnpCustomizationsWinPE",
            )
            .unwrap();
            let paths = texts(pnp, "Path");
            for dir in required_virtio_win_paths(version)
                .iter()
                .filter(|p| !p.ends_with(".msi"))
            {
                let want = format!("E:{}", dir.replace('/', "\\"));
                assert!(
                    paths.contains(&want.as_str()),
                    "{version:?}: {want} not in {paths:?}"
                );
            }
            let v = version.virtio_win_dir();
            assert!(
                paths.iter().all(|p| p.contains(&format!("\\{v}\\amd64"))),
                "{paths:?}"
            );

            // LabConfig only where Windows 11 checks the machine.
            let lab = xml.contains("LabConfig");
            assert_eq!(lab, version == WindowsVersion::Windows11, "{version:?}");
            if lab {
                for check in ["BypassTPMCheck", "BypassSecureBootCheck", "BypassRAMCheck"] {
                    assert!(xml.contains(check), "{check}");
                }
            }

            // The administrator logs on by itself, and its first logon runs the script.
            let oobe = component(&doc, "oobeSystem", "Microsoft-Windows-Shell-Setup").unwrap();
            assert_eq!(texts(oobe, "Username"), ["vmbuild"]);
            assert!(texts(oobe, "Enabled").contains(&"true"));
            // The password survives escaping exactly.
            assert!(texts(oobe, "Value").iter().all(|v| *v == "p<&>\"'w"));
            let commands = texts(oobe, "CommandLine");
            assert_eq!(commands.len(), 1);
            assert!(
                commands[0].contains("(call %d:\\vmbuild\\setup.cmd %d:"),
                "{}",
                commands[0]
            );
            assert!(commands[0].contains("& exit /b"), "{}", commands[0]);
        }
    }
}
